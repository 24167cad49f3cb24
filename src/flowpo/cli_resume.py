"""What `flowpo train --resume` may change in a run's config, and its iteration budget."""
from __future__ import annotations

import sys
from pathlib import Path

from flowpo.cli_errors import UsageError


RESUMABLE = ("train.iterations", "eval.every", "train.checkpoint_every", "train.keep_checkpoints", "train.threads",
             "log.", "model.device", "model.attention")
"""Config keys a resumed run may change (cadences, budget, logging, where it runs); any other would
change the method or the trajectory mid-run."""


RESUMABLE_REWARD_OPTIONS = ("device", "batch_size", "threads", "path", "processor_path", "head")
"""reward.options.<name>.<key> a resumed run may change: where the scorer runs and where its
files live (a moved folder), not what it computes."""


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def _is_default_option(key: str, value, old: dict) -> bool:
    """reward.options.<name>.<key> newly given with the scorer's default value: no change."""
    if not key.startswith("reward.options.") or key in old:
        return False
    from flowpo.rewards import option_defaults

    name, opt = key[len("reward.options."):].rsplit(".", 1)
    defaults = option_defaults(name)
    return opt in defaults and defaults[opt] == value


def _leaves(cfg) -> dict:
    """describe()'s keys, with reward.options split into reward.options.<name>.<key>."""
    from flowpo.config import describe

    out = {}
    for key, _, value, _, _ in describe(cfg):
        if key == "reward.options":
            out.update({f"{key}.{n}.{k}": v for n, opts in value.items() for k, v in (opts or {}).items()})
        else:
            out[key] = value
    return out


def check_resume_changes(base, cfg) -> None:
    """Refuse overrides that change a non-resumable key of the run's config; say which ones apply."""
    from flowpo.errors import show

    old, new = _leaves(base), _leaves(cfg)
    changed = [k for k in new if new[k] != old.get(k) and not _is_default_option(k, new[k], old)]
    changed += [k for k in old if k not in new]
    bad = [k for k in changed if not _resumable(k) and not (k.startswith("reward.options.")
                                                            and k.rsplit(".", 1)[1] in RESUMABLE_REWARD_OPTIONS)]
    if bad:
        allowed = ", ".join([k + "*" if k.endswith(".") else k for k in RESUMABLE]
                            + [f"reward.options.*.{k}" for k in RESUMABLE_REWARD_OPTIONS])
        raise UsageError(f"--resume cannot change {', '.join(f'{k} ({show(old.get(k))} → {show(new.get(k))})' for k in bad)}: "
                         f"it would change the method or the trajectory mid-run; a resumed run may change only "
                         f"{allowed} (start a new run with another --out for anything else)")
    if changed:
        print(f"flowpo: --resume: applying {', '.join(f'{k}={show(new.get(k))}' for k in changed)}", file=sys.stderr)


def check_resume_budget(cfg, out: Path) -> None:
    """Refuse a train.iterations below what the run has done; say so when it is already done."""
    from flowpo.training.runlog import read_metrics

    try:
        rows = read_metrics(out / "metrics.jsonl")
    except ValueError as e:
        raise UsageError(f"--resume: {e}") from None
    done = max((r["step"] + 1 for r in rows if isinstance(r, dict) and "reward_mean" in r
                and type(r.get("step")) is int), default=0)
    if cfg.train.iterations < done:
        raise UsageError(f"--resume: train.iterations={cfg.train.iterations} is below the {done} iterations this run "
                         f"has done; give train.iterations >= {done}")
    if cfg.train.iterations == done:
        print(f"flowpo: --resume: {out} has already done its train.iterations={done}; raise train.iterations to "
              "continue it", file=sys.stderr)
