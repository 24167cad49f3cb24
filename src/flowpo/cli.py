"""Command line: flowpo train | eval | sample | pretrain | bench | presets | config.

    flowpo train [--config FILE] [--preset NAME] [--out DIR] [--resume DIR] [key.path=value ...]
    flowpo eval --run DIR [key.path=value ...]
    flowpo sample --run DIR --prompt "a handwritten 7" [--n 8] [--out FILE.png]
    flowpo pretrain [--out DIR] [--seed N]
    flowpo bench [--out DIR] [...]          (see `flowpo bench --help`)
    flowpo presets
    flowpo config [--preset NAME] [key.path=value ...]   (every key: type, value, allowed, help)
Bad input exits with status 2 and one line naming the problem and the fix.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    pass


def _cmd_presets(_args, _rest) -> int:
    from flowpo.presets import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        if p.ablation_of is None:
            print(f"{name:<{width}}  {p.description}  [{p.paper}]")
    print("\nablation variants:")
    for name, p in PRESETS.items():
        if p.ablation_of is not None:
            print(f"{name:<{width}}  {p.description}")
    return 0


def _load_cfg(args, rest):
    from flowpo import config

    return config.load(args.config, args.preset, rest)


def _run_cfg(run: str, flag: str, rest):
    """The resolved config.yaml of an earlier run folder, with `rest` overrides applied."""
    from flowpo import config

    path = Path(run)
    if not (path / "config.yaml").exists():
        raise UsageError(f"{flag} {run}: no config.yaml there; give the --out folder of a training run")
    return config.load(str(path / "config.yaml"), None, rest), path


def _cmd_train(args, rest) -> int:
    from flowpo.training.trainer import train

    if args.resume:
        cfg, out = _run_cfg(args.resume, "--resume", rest)
    else:
        cfg = _load_cfg(args, rest)
        if not args.out and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("under torchrun give --out DIR: every process must write to the same run folder")
        out = Path(args.out or f"runs/{cfg.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(cfg, out, resume=bool(args.resume))
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(f"final eval_reward_mean={result['eval_reward_mean']:.4f}  run: {out}")
    return 0


def _cmd_eval(args, rest) -> int:
    import json

    from flowpo.parts import eval_prompts, resolve_device
    from flowpo.rewards import RewardSet
    from flowpo.schedule import sigmas
    from flowpo.training.state import load_policy
    from flowpo.training.trainer import evaluate_policy

    cfg, path = _run_cfg(args.run, "--run", rest) if args.run else (_load_cfg(args, rest), None)
    try:
        policy, iteration = load_policy(cfg, path)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    rec, _ = evaluate_policy(cfg, policy, RewardSet(cfg.reward.names, cfg.reward.weights), eval_prompts(cfg),
                             sigmas(cfg.eval.steps, cfg.sample.shift), resolve_device(cfg.model.device))
    print(json.dumps({"step": iteration, **rec}))
    return 0


def _cmd_config(args, rest) -> int:
    """Print every config key: type, default (or the preset's value), allowed values, help."""
    from flowpo import config

    cfg = _load_cfg(args, rest) if (args.preset or args.config or rest) else config.Config()
    for key, typ, value, allowed, doc in config.describe(cfg):
        line = f"{key} ({typ}) = {value!r}"
        if allowed:
            line += f"   allowed: {', '.join(map(str, allowed))}"
        print(line)
        if doc:
            print("    " + doc.replace("\n", "\n    "))
    return 0


def _cmd_sample(args, rest) -> int:
    import torch

    from flowpo.training import checkpoint
    from flowpo.parts import build_policy
    from flowpo.rollout import ode_sample, row_noise
    from flowpo.training.runlog import save_grid
    from flowpo.schedule import sigmas

    cfg = _run_cfg(args.run, "--run", rest)[0] if args.run else _load_cfg(args, rest)
    policy = build_policy(cfg.model)
    if args.run:
        ck = checkpoint.latest(args.run)
        if ck is None:
            raise UsageError(f"--run {args.run}: no checkpoint under {args.run}/checkpoints")
        policy.load_trainable_state_dict(checkpoint.load(ck)[0]["trainable"])
    prompts = [args.prompt] * args.n
    x = row_noise(list(range(args.seed, args.seed + args.n)), policy.latent_shape)
    g = cfg.eval.guidance if cfg.eval.guidance is not None else cfg.sample.guidance
    with torch.no_grad():
        x0, _ = ode_sample(policy, policy.encode_prompts(prompts), sigmas(cfg.eval.steps, cfg.sample.shift), x, g,
                           cfg.sample.batch_size)
        images = policy.decode(x0)
    save_grid(images, args.out, nrow=min(8, args.n))
    print(f"wrote {args.out}")
    return 0


def _cmd_pretrain(_args, rest) -> int:
    from flowpo.embedded.pretrain import main

    return main(rest) or 0


def _cmd_bench(_args, rest) -> int:
    from flowpo.bench import main

    return main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowpo", description="GRPO-family RL post-training for flow-matching models")
    sub = ap.add_subparsers(dest="verb", required=True)
    for verb in ("train", "eval", "sample", "config"):
        sp = sub.add_parser(verb, help="print every config key with its type, value, allowed values and help"
                            if verb == "config" else None)
        sp.add_argument("--config", help="YAML config file (see configs/)")
        sp.add_argument("--preset", help="preset name (flowpo presets)")
        if verb == "config":
            continue
        if verb == "train":
            sp.add_argument("--help-config", action="store_true",
                            help="print every config key with its help (as `flowpo config`) and exit")
            sp.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
            sp.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
        else:
            sp.add_argument("--run", help="a training run directory (its config and latest checkpoint)")
        if verb == "sample":
            sp.add_argument("--prompt", required=True)
            sp.add_argument("--n", type=int, default=8)
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--out", default="samples.png")
    sub.add_parser("pretrain", add_help=False)
    sub.add_parser("bench", add_help=False)
    sub.add_parser("presets")
    return ap


def main(argv: list[str] | None = None) -> int:
    from flowpo.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv and argv[0] in ("pretrain", "bench"):
        args, rest = argparse.Namespace(verb=argv[0]), argv[1:]
    else:
        args, rest = ap.parse_known_args(argv)
        bad = [r for r in rest if "=" not in r]
        if bad:
            ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key.path=value)")
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "pretrain": _cmd_pretrain,
                "bench": _cmd_bench, "presets": _cmd_presets, "config": _cmd_config}
    if getattr(args, "help_config", False):
        args.verb = "config"
    try:
        return handlers[args.verb](args, rest)
    except (ConfigError, UsageError, FileNotFoundError, FileExistsError) as e:
        print(f"flowpo: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `flowpo config | head`
        return 0
    except KeyboardInterrupt:
        print("flowpo: interrupted; resume with flowpo train --resume DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
