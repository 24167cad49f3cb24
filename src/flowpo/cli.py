"""Command line: flowpo train | eval | sample | export | pretrain | bench | serve-reward | presets | config.

    flowpo train [--config FILE] [--preset NAME] [--out DIR] [--resume DIR] [key.path=value ...]
    flowpo eval --run DIR [key.path=value ...]
    flowpo sample --run DIR --prompt "a handwritten 7" [--n 8] [--out FILE.png] [--image SRC.png]
    flowpo export --run DIR --out DIR [--no-ema]   (a run's weights as one model folder)
    flowpo pretrain [--out DIR] [--seed N]
    flowpo bench [--out DIR] [...]          (see `flowpo bench --help`)
    flowpo serve-reward --reward NAME [--reward LABEL=TARGET ...] [--host 127.0.0.1] [--port 8765]
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

from flowpo.cli_errors import UsageError, explain  # (explain: also the tests' one-line check)
from flowpo.cli_resume import check_resume_budget, check_resume_changes


def _abbrev(text) -> str:
    from flowpo.errors import abbrev

    return abbrev(str(text))


class _Terminated(BaseException):
    """SIGTERM during `flowpo train` (raised by the signal handler)."""


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

    for flag, value in (("--config", args.config), ("--preset", args.preset)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} '' is empty; give a {'YAML file' if flag == '--config' else 'preset name'} "
                             "or leave the option out")
    return config.load(args.config, args.preset, rest)


def _run_cfg(run: str, flag: str, rest):
    """The resolved config.yaml of an earlier run folder, with `rest` overrides applied."""
    from flowpo import config

    path = Path(run)
    if not (path / "config.yaml").exists():
        raise UsageError(f"{flag} {run}: no config.yaml there; give the --out folder of a training run")
    return config.load(str(path / "config.yaml"), None, rest, keep_resolved=True), path


def _check_out(out: str, flag: str = "--out", *, folder: bool = True) -> Path:
    """A usable --out path: not empty, not an existing file where a folder goes (one line otherwise)."""
    if not out.strip():
        raise UsageError(f"{flag} '' is empty; give a path, e.g. {flag} runs/my-run")
    path = Path(out)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {_abbrev(out)} is an existing file, not a folder; give a folder path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag} {_abbrev(out)}: {parent} is a file, not a folder; give a path under a folder")
    return path


_RUN: dict = {}
"""The run folder `flowpo train` works on (for the interrupt message)."""


def _cmd_train(args, rest) -> int:
    from flowpo.errors import ConfigError

    if args.resume is not None:
        given = [f for f, v in (("--preset", args.preset), ("--config", args.config), ("--out", args.out))
                 if v is not None]
        if given:
            raise UsageError(f"--resume continues the run as its config.yaml says; {', '.join(given)} cannot change "
                             "it: drop them (or start a new run with another --out)")
        import copy

        from flowpo import config

        _check_out(args.resume, "--resume")
        base, out = _run_cfg(args.resume, "--resume", [])
        cfg = copy.deepcopy(base)
        for ov in rest:  # applied unvalidated first, so a forbidden change is named before any range check
            key, _, value = ov.partition("=")
            config.set_key(cfg, key.strip(), value)
        check_resume_changes(base, cfg)
        config.validate(cfg)
    else:
        if args.out is not None:
            _check_out(args.out)
        cfg = _load_cfg(args, rest)
        if not args.out and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("under torchrun give --out DIR: every process must write to the same run folder")
        out = Path(args.out or f"runs/{cfg.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    from flowpo.training.runlock import hold

    rank = int(os.environ.get("RANK", "0"))
    _RUN.update(out=out, checkpoint_every=cfg.train.checkpoint_every)
    # one writer per run folder: rank 0 holds the lock for the whole job (readers never take it)
    with hold(out, rank=rank, command="flowpo train --resume" if args.resume is not None else "flowpo train"):
        if args.resume is not None:
            check_resume_budget(cfg, out)
        from flowpo.training.trainer import Trainer

        try:  # building the run validates its inputs (model folder, prompts, rewards): a ValueError there is bad input
            trainer = Trainer(cfg, out, resume=args.resume is not None)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from e
        result = trainer.run()
    if result and rank == 0:
        print(f"final eval_reward_mean={result['eval_reward_mean']:.4f}  run: {out}")
    return 0


def _cmd_eval(args, rest) -> int:
    import json

    from flowpo.parts import eval_prompts, resolve_device
    from flowpo.rewards import RewardSet
    from flowpo.training.state import load_policy
    from flowpo.training.evaluate import evaluate_policy

    if args.records is not None:
        _check_out(args.records, "--records", folder=False)
        if Path(args.records).is_dir():
            raise UsageError(f"--records {_abbrev(args.records)} is a folder; give a file path for the JSON lines")
    cfg, path = _run_cfg(args.run, "--run", rest) if args.run is not None else (_load_cfg(args, rest), None)
    try:
        policy, iteration = load_policy(cfg, path, announce="--run")
    except (FileNotFoundError, ValueError) as e:  # a missing checkpoint, a model folder the library rejects
        raise UsageError(str(e)) from None
    rewards = RewardSet(cfg.reward.names, cfg.reward.weights, cfg.reward.options)
    rec, _, records = evaluate_policy(cfg, policy, rewards, eval_prompts(cfg),
                                      policy.sigmas(cfg.eval.steps, cfg.sample.shift), resolve_device(cfg.model.device))
    if args.records:
        Path(args.records).parent.mkdir(parents=True, exist_ok=True)
        Path(args.records).write_text("".join(json.dumps(r) + "\n" for r in records))
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

    from flowpo.policy.edit import encode_rows
    from flowpo.rollout import ode_sample, row_noise
    from flowpo.training.runlog import save_grid
    from flowpo.training.state import load_policy

    out = _check_sample_args(args)
    cfg = _run_cfg(args.run, "--run", rest)[0] if args.run is not None else _load_cfg(args, rest)
    try:  # the run's evaluated weights (its EMA, if it kept one)
        policy, _ = load_policy(cfg, args.run, announce="--run")
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    prompts = [args.prompt] * args.n
    metadata = [{"images": _check_images(args.image)}] * args.n if args.image else None
    x = row_noise(list(range(args.seed, args.seed + args.n)), policy.latent_shape)
    g = cfg.eval.guidance if cfg.eval.guidance is not None else cfg.sample.guidance
    with torch.no_grad():
        x0, _ = ode_sample(policy, encode_rows(policy, prompts, metadata), policy.sigmas(cfg.eval.steps, cfg.sample.shift), x, g,
                           cfg.sample.batch_size)
        images = policy.decode(x0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=min(8, args.n), labels=[f"seed {args.seed + i}" for i in range(args.n)])
    print(f"wrote {out}")
    return 0


SAMPLE_MAX_N = 1024
"""`flowpo sample --n`: the most samples one grid holds."""


def _check_images(paths: list[str]) -> list[str]:
    """`flowpo sample --image`: each path an image file that opens, as absolute paths."""
    from PIL import Image

    out = []
    for p in paths:
        f = Path(p).expanduser().resolve()
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:  # PIL raises many kinds for a file that is not an image
            raise UsageError(f"--image {_abbrev(p)} does not open as an image ({type(e).__name__}); give a "
                             "PNG/JPEG/WebP file") from None
        out.append(str(f))
    return out


def _check_sample_args(args) -> Path:
    """`flowpo sample`'s own options, each refused in one line naming it; returns the --out path."""
    if not 1 <= args.n <= SAMPLE_MAX_N:
        raise UsageError(f"--n {args.n} is out of range; give 1 to {SAMPLE_MAX_N} samples")
    if not 0 <= args.seed <= 2 ** 63 - 1 - args.n:
        raise UsageError(f"--seed {_abbrev(args.seed)} is out of range; give 0 to 2**63 - 1 - n")
    out = _check_out(args.out, "--out", folder=False)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        raise UsageError(f"--out {_abbrev(args.out)} is a folder; give an image file path, e.g. --out samples.png")
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out {_abbrev(args.out)}: {out.suffix or 'no suffix'} is not an image format; end the "
                         "file name with .png (or .jpg, .webp)")
    return out


def _cmd_export(args, rest) -> int:
    from flowpo.training.state import export

    out = _check_out(args.out, "--out")
    if out.exists():
        raise UsageError(f"--out {_abbrev(args.out)} exists; give a new folder (export never writes into an "
                         "existing one)")
    cfg, path = _run_cfg(args.run, "--run", rest)
    try:
        it = export(cfg, path, out, ema=not args.no_ema)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {args.out} (iteration {it})")
    return 0


def _cmd_pretrain(_args, rest) -> int:
    from flowpo.embedded.pretrain import main

    return main(rest) or 0


def _cmd_serve_reward(args, _rest) -> int:
    from flowpo.rewards.server import serve
    from flowpo.rewards.service import Limits

    limits = Limits(pixels_per_image=args.max_pixels_per_image, pixels_per_request=args.max_pixels_per_request,
                    images_per_request=args.max_images_per_request)
    return serve(args.reward, args.option or [], args.host, args.port, args.max_request_mb, args.log_level, limits)


def _cmd_bench(_args, rest) -> int:
    from flowpo.bench import main

    return main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowpo", description="GRPO-family RL post-training for flow-matching models")
    sub = ap.add_subparsers(dest="verb", required=True)
    helps = {"train": "train a policy (a preset, a YAML config, key.path=value overrides)",
             "eval": "evaluate a run's latest checkpoint (or the base model) on the held-out prompts",
             "sample": "write a PNG grid of samples for one prompt",
             "config": "print every config key with its type, value, allowed values and help"}
    overrides_help = ("Overrides: any number of key.path=value after the options, e.g. train.iterations=40 "
                      "reward.names=[digit_alignment]; `flowpo config` lists every key with its help.")
    for verb in ("train", "eval", "sample", "config"):
        sp = sub.add_parser(verb, help=helps[verb], description=helps[verb] + ". " + overrides_help)
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
        if verb == "eval":
            sp.add_argument("--records", metavar="FILE",
                            help="also write one JSON line per sample (prompt, metadata, rewards) to FILE")
        if verb == "sample":
            sp.add_argument("--prompt", required=True, help="the text prompt")
            sp.add_argument("--image", action="append", default=None,
                            help="a source image to edit (editing models; repeat for several)")
            sp.add_argument("--n", type=int, default=8, help="how many samples (default 8)")
            sp.add_argument("--seed", type=int, default=0, help="first noise seed (sample i uses seed + i)")
            sp.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    ex = sub.add_parser("export", help="write a run's latest checkpoint (sharded or not) as one model folder: the "
                                       "transformer in diffusers format (full), the LoRA (lora), adapter files (embedded)")
    ex.add_argument("--run", required=True, help="a training run directory")
    ex.add_argument("--out", required=True, help="folder to write (must not exist)")
    ex.add_argument("--no-ema", action="store_true", help="the trained weights, not the EMA (default: the EMA "
                                                             "when the run kept one, i.e. what it evaluated)")
    sub.add_parser("pretrain", add_help=False, help="retrain the embedded model and its classifier (flowpo pretrain --help)")
    sub.add_parser("bench", add_help=False, help="presets × seeds × tasks benchmark (flowpo bench --help)")
    sp = sub.add_parser("serve-reward", help="serve reward scorers over HTTP for remote training processes",
                        description="Serve registered or dotted-path reward scorers over HTTP (protocol 1: "
                                    "safetensors or PNG in, JSON out, no pickle; docs/reward_services.md). "
                                    "Train against it with reward.names=[remote] reward.options.remote.url=...")
    sp.add_argument("--reward", action="append", required=True, metavar="NAME | LABEL=TARGET",
                    help="a registered reward or package.module:function, optionally served under LABEL; repeatable")
    sp.add_argument("--option", action="append", metavar="LABEL.KEY=VALUE",
                    help="an option of a served scorer, e.g. pickscore.device=cuda:1; repeatable")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    sp.add_argument("--max-request-mb", type=float, default=256.0, help="largest request body (default 256 MiB)")
    sp.add_argument("--max-pixels-per-image", type=int, default=4096 * 4096, metavar="N",
                    help="largest image, H·W (a video: frames·H·W), read from its header before decoding "
                         "(default 16777216 = 4096²)")
    sp.add_argument("--max-pixels-per-request", type=int, default=64 * 1024 * 1024, metavar="N",
                    help="most pixels decoded for one request, all images and frames together (default 67108864 "
                         "= 64 images of 1024²; about 0.8 GB as float32 RGB)")
    sp.add_argument("--max-images-per-request", type=int, default=4096, metavar="N",
                    help="most images in one request (default 4096)")
    sp.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default warning)")
    sub.add_parser("presets", help="list the methods (presets) with their papers")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if argv and argv[0] in ("pretrain", "bench"):
        args, rest = argparse.Namespace(verb=argv[0]), argv[1:]
    else:
        args, rest = ap.parse_known_args(argv)
        bad = [r for r in rest if "=" not in r]
        if bad:
            ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key.path=value)")
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "export": _cmd_export,
                "pretrain": _cmd_pretrain, "bench": _cmd_bench, "presets": _cmd_presets, "config": _cmd_config,
                "serve-reward": _cmd_serve_reward}
    if getattr(args, "help_config", False):
        args.verb = "config"
    import signal

    def _terminated(signum, frame):
        raise _Terminated()

    if args.verb == "train":
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return handlers[args.verb](args, rest)
    except BrokenPipeError:  # `flowpo config | head`
        return 0
    except KeyboardInterrupt:
        print(_stopped("interrupted", args.verb), file=sys.stderr)
        return 130
    except _Terminated:
        print(_stopped("terminated (SIGTERM)", args.verb), file=sys.stderr)
        return 143
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - one line per failure (FLOWPO_DEBUG=1 for the traceback)
        if os.environ.get("FLOWPO_DEBUG") == "1":
            raise
        code, msg = explain(e)
        print(f"flowpo: error: {msg}", file=sys.stderr)
        return code
    finally:
        _RUN.clear()


def _stopped(how: str, verb: str) -> str:
    """The line after Ctrl-C or SIGTERM: for `train`, what --resume will do with the run folder."""
    out = _RUN.get("out")
    if verb != "train" or out is None or not Path(out).is_dir() or int(os.environ.get("RANK", "0")) != 0:
        return f"flowpo: {how}"
    from flowpo.training import checkpoint

    last = checkpoint.latest(out)
    if last is None:
        every = _RUN.get("checkpoint_every")
        when = f"every {every} iterations" if every else "at the end only"
        return (f"flowpo: {how} before the run's first checkpoint (train.checkpoint_every={every}: {when}); nothing "
                f"is kept to continue from: flowpo train --resume {out} starts this run afresh in the same folder")
    return (f"flowpo: {how}; continue with: flowpo train --resume {out} (from its last checkpoint, {last.name}; "
            "later iterations are redone)")


if __name__ == "__main__":
    sys.exit(main())
