# Two commands: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.flowpo-installed

.PHONY: demo test test-all install bench clean-venv

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch==2.13.0 is the CPU build provided on CPU machines; a torch already importable in the
# venv (for example a GPU user's CUDA build) is kept.
$(STAMP): $(VPY) pyproject.toml
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/flowpo train --out runs/demo

test: $(STAMP)
	$(VPY) -m pytest -q -m "not slow or ci"

test-all: $(STAMP)
	$(VPY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/flowpo bench --out runs/bench

clean-venv:
	rm -rf $(VENV)
