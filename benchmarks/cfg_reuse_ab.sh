#!/usr/bin/env bash
# Issue 32 A/B: s / iteration before (BEFORE, default 42afb90: CFG as one 2N-row forward, no reuse)
# and after (this tree: model.cfg_uncond=reuse), interleaved A B B A per benchmarks/ab_trees.py, at
# 1 thread, on (1) the embedded default (no CFG), (2) the embedded model with CFG 4.5, (3) the tiny
# SD3 pipeline with CFG 4.5 (2 prompts × 4, T 10, LoRA r 8, one optimizer step per iteration),
# (4) SD3.5-M width (1 of 24 blocks, 128 px, T5 16 tokens) with CFG 4.5, same batch.
#   [AFTER=tree] bash benchmarks/cfg_reuse_ab.sh [OUT=runs/ab32] [BEFORE=42afb90]   (AFTER: default this tree)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ab32}; BEFORE=${2:-42afb90}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -d /tmp/ab32_before ] || git worktree add --detach /tmp/ab32_before "$BEFORE" >/dev/null
PRESETS=${PRESETS:-flow_grpo,mix_grpo,op_grpo,stepwise_grpo,awm}
PYTHONPATH=tests:benchmarks:src $PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from tiny_pipelines import save_tiny, tiny_sd3_pipeline
from real_shapes import build_pipeline
out = Path(sys.argv[1])
if not (out / "pipes" / "tiny_sd3").exists():
    save_tiny(tiny_sd3_pipeline(seed=0), out / "pipes" / "tiny_sd3")
if not (out / "pipes" / "sd35m_w").exists():
    save_tiny(build_pipeline("sd3", 1, (1, 2)), out / "pipes" / "sd35m_w")
PYEOF
AFTER=${AFTER:-.}
AB="$PY benchmarks/ab_trees.py --a /tmp/ab32_before --b $AFTER --presets $PRESETS"
COMMON="train.minibatches=1 sample.prompts_per_iteration=2 sample.group_size=4 sample.batch_size=8 sample.steps=10"
echo "== embedded default"; $AB --pairs 2 --rounds 2 --out "$OUT/embedded" | tee "$OUT/embedded.md"
echo "== embedded, CFG 4.5"; $AB --pairs 2 --rounds 2 --out "$OUT/embedded_cfg" sample.guidance=4.5 | tee "$OUT/embedded_cfg.md"
echo "== tiny SD3, CFG 4.5"; $AB --pairs 2 --rounds 2 --out "$OUT/tiny_sd3" model.kind=sd3 model.path="$OUT/pipes/tiny_sd3" \
    model.resolution=16 model.lora_rank=8 model.lora_alpha=8 sample.guidance=4.5 $COMMON \
    "reward.names=[jpeg_incompressibility]" | tee "$OUT/tiny_sd3.md"
echo "== SD3.5-M width (1 block, 128 px), CFG 4.5"; $AB --pairs 2 --rounds 1 --out "$OUT/sd35m_w" model.kind=sd3 \
    model.path="$OUT/pipes/sd35m_w" model.resolution=128 model.lora_rank=32 model.lora_alpha=64 model.max_sequence_length=16 \
    sample.guidance=4.5 $COMMON "reward.names=[jpeg_incompressibility]" | tee "$OUT/sd35m_w.md"
