"""Reward scorers: a registry by name, user scorers by dotted path, options per reward, metadata.

A scorer is `fn(images, prompts, metadata) -> rewards` with
    images:   float tensor [N, C, H, W] in [0, 1] (the policy's `decode` output), or a video
              batch [N, C, F, H, W] (applied per the `frames` option: the first frame, or the
              mean of the per-frame scores),
    prompts:  list[str] of length N,
    metadata: list[dict] of length N (the prompt file's extra fields; empty dicts for .txt files),
    returns:  float tensor (or array/list) [N], larger is better; or a mapping
              {"scores": [N], "<field>": [N], ...} whose extra per-sample fields (e.g. GenEval's
              `correct`, a judge's `unreadable`) are logged as reward/<name>/<field>.
Two-argument scorers `fn(images, prompts)` keep working. A user scorer plugs in as
`reward.names=[my_package.my_module:my_function]`. `base@label` names a second instance of a
scorer with its own options (e.g. `remote@geneval` and `remote@judge`, two services).

Options: `reward.options.<name>.<key>=value`. A registered scorer that is a class is built with
its options as keyword arguments; a function (registered or dotted path) receives them as keyword
arguments on every call. Every scorer also takes `batch_size` (score at most that many images per
call; 0: all at once) and `frames` (first | mean, for videos). An option the scorer does not take
is one line naming the allowed ones. Python: `get_scorer(name, **options)`.

`RewardSet.score` refuses NaN/inf, exceptions and wrong lengths with a message that names the
reward, so no silent NaN reaches the weights.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from typing import Any, Callable

import torch

from flowpo.errors import ConfigError
from flowpo.rewards.loading import RewardOptionError  # a bad option: one line, exit code 2

Scorer = Callable[..., torch.Tensor]

# name → "module:attr" (a class built with the options, or a scorer function), imported on use so
# that `import flowpo.rewards` pulls in no transformers
REGISTRY: dict[str, str] = {
    "digit_alignment": "flowpo.embedded.rewards:digit_alignment",
    "digit_bold": "flowpo.embedded.rewards:digit_bold",
    "jpeg_compressibility": "flowpo.embedded.rewards:jpeg_compressibility",
    "jpeg_incompressibility": "flowpo.embedded.rewards:jpeg_incompressibility",
    "stroke_quality": "flowpo.embedded.rewards:stroke_quality",
    "pickscore": "flowpo.rewards.clip:PickScore",
    "clipscore": "flowpo.rewards.clip:CLIPScore",
    "aesthetic": "flowpo.rewards.clip:Aesthetic",
    "image_consistency": "flowpo.rewards.edit:ImageConsistency",
    "hpsv2": "flowpo.rewards.hps:HPSv2",
    "imagereward": "flowpo.rewards.imagereward:ImageReward",
    "ocr": "flowpo.rewards.ocr:OCR",
    "remote": "flowpo.rewards.remote:Remote",
    "vlm_judge": "flowpo.rewards.vlm:VLMJudge",
}
COMMON_OPTIONS = ("batch_size", "frames")


class RewardError(RuntimeError):
    """A reward scorer failed or returned non-finite values (a runtime failure: exit code 1)."""


class RewardNameError(ConfigError, RewardError):
    """An unknown reward name, option, or a dotted path that does not import (bad input: exit code 2)."""


def available() -> list[str]:
    return sorted(REGISTRY)


def base_name(name: str) -> str:
    """`base@label` → base (a second instance of a scorer under its own name); else the name."""
    return name.partition("@")[0] if "@" in name else name


def _target(name: str):
    name = base_name(name)
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        what = f"reward {name!r}"
    elif name in REGISTRY:
        mod_name, _, attr = REGISTRY[name].partition(":")
        what = f"reward {name!r} ({REGISTRY[name]})"
    else:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardNameError(f"unknown reward {name!r}{hint}; registered: {available()}, "
                              "or give a dotted path package.module:function")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RewardNameError(f"{what}: cannot import module {mod_name!r} ({e}); check the dotted path "
                              "package.module:function and that it is installed") from None
    obj = getattr(mod, attr, None)
    if not callable(obj):
        raise RewardNameError(f"{what}: module {mod_name!r} has no callable {attr!r}")
    return obj


def _params(obj) -> tuple[list[inspect.Parameter], bool]:
    """(keyword-settable parameters, accepts **kwargs) of a class's __init__ or a function."""
    try:
        sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    except (TypeError, ValueError):  # builtins without a signature
        return [], True
    ps = [p for p in sig.parameters.values() if p.name != "self"]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in ps)
    return [p for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)], var_kw


def _takes_metadata(fn) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    ps = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in ps) or "metadata" in sig.parameters:
        return True
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) >= 3


def _coerce_option(name: str, key: str, value: Any, param: inspect.Parameter | None, hints: dict) -> Any:
    hint = hints.get(key)
    if hint is None and param is not None and type(param.default) in (bool, int, float, str):
        hint = type(param.default)  # unannotated: the default's type
    if hint is None or param is None:
        return value
    from flowpo.config import _coerce  # one coercion for the whole config

    try:
        return _coerce(f"reward.options.{name}.{key}", value, hint)
    except ConfigError as e:
        raise RewardOptionError(str(e)) from None
    except Exception:  # noqa: BLE001 - a hint _coerce does not know (e.g. a user class): pass as is
        return value


def _split_options(name: str, obj, options: dict) -> dict:
    params, var_kw = _params(obj)
    by_name = {p.name: p for p in params}
    if inspect.isclass(obj):
        settable = [p.name for p in params]
    else:  # a function's leading data arguments (images, prompts[, metadata]) are not options
        settable = [p.name for p in params[3 if _takes_metadata(obj) else 2:]]
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no coercion
        hints = {}
    out = {}
    for k, v in options.items():
        if k not in settable and not var_kw:
            allowed = sorted(settable) + list(COMMON_OPTIONS)
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RewardOptionError(f"reward.options.{name}.{k}: reward {name!r} has no option {k!r}{hint}; "
                                  f"its options: {allowed}")
        out[k] = _coerce_option(name, k, v, by_name.get(k), hints)
    return out


def option_defaults(name: str) -> dict:
    """The options of reward `name` that have defaults → {option: default} (best effort: {} when
    the scorer does not import)."""
    try:
        obj = _target(name)
    except ConfigError:
        return {}
    params, _ = _params(obj)
    out = {"batch_size": 0, "frames": "first"}
    out.update({p.name: p.default for p in params if p.default is not p.empty})
    return out


class _Scorer:
    """One configured scorer: options bound, metadata passed when the function takes it, videos
    reduced per `frames`, batches split per `batch_size`."""

    def __init__(self, name: str, fn, call_kw: dict, *, batch_size: int, frames: str):
        self.name, self.fn, self.call_kw = name, fn, call_kw
        self.batch_size, self.frames = batch_size, frames
        self.meta = _takes_metadata(fn)
        try:
            p = inspect.signature(fn).parameters.get("metadata")
        except (TypeError, ValueError):
            p = None
        if p is not None and p.kind is p.KEYWORD_ONLY:
            self.meta = "keyword"

    def _call(self, images, prompts, metadata):
        if self.meta == "keyword":
            return self.fn(images, prompts, metadata=metadata, **self.call_kw)
        if self.meta:
            return self.fn(images, prompts, metadata, **self.call_kw)
        return self.fn(images, prompts, **self.call_kw)

    def _batched(self, images, prompts, metadata) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = images.shape[0]
        bs = self.batch_size if self.batch_size > 0 else max(1, n)
        outs, details = [], []
        for i in range(0, n, bs):
            r, d = split_result(self._call(images[i:i + bs], prompts[i:i + bs], metadata[i:i + bs]))
            outs.append(r)
            details.append(d)
        keys = sorted(set().union(*details)) if details else []
        missing = [k for k in keys if any(k not in d for d in details)]
        if missing:
            raise ValueError(f"detail field {missing[0]!r} is returned for some batches only")
        return (torch.cat(outs) if outs else torch.zeros(0)), {k: torch.cat([d[k] for d in details]) for k in keys}

    def detailed(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scores [N], {field: [N]}) — the extra per-sample fields a scorer returned."""
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        if images.ndim == 5:  # video [N, C, F, H, W]
            if self.frames == "first":
                return self._batched(images[:, :, 0], prompts, metadata)
            n, f = images.shape[0], images.shape[2]
            flat = images.permute(0, 2, 1, 3, 4).reshape(n * f, *images.shape[1:2], *images.shape[3:])
            r, d = self._batched(flat, [p for p in prompts for _ in range(f)], [m for m in metadata for _ in range(f)])
            if r.numel() != n * f:
                return r, {}
            return r.reshape(n, f).mean(1), {k: v.reshape(n, f).mean(1) for k, v in d.items() if v.numel() == n * f}
        return self._batched(images, prompts, metadata)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        return self.detailed(images, prompts, metadata)[0]


def split_result(r) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A scorer's return value → (scores [n] fp32 CPU, {field: [n]}); a mapping must hold 'scores'."""
    def flat(v):
        return torch.as_tensor(v).detach().to("cpu", torch.float32).reshape(-1)

    if isinstance(r, dict):
        if "scores" not in r:
            raise ValueError(f"a scorer returning a mapping must include 'scores' (got keys {sorted(r)})")
        return flat(r["scores"]), {str(k): flat(v) for k, v in r.items() if k != "scores"}
    return flat(r), {}


def get_scorer(name: str, **options) -> Scorer:
    """A registered name or `package.module:function`, configured with `options` → a scorer
    `fn(images, prompts, metadata=None) -> [N]` (CPU fp32)."""
    options = dict(options)
    from flowpo.config import _coerce

    try:
        batch_size = _coerce(f"reward.options.{name}.batch_size", options.pop("batch_size", 0), int)
    except ConfigError as e:
        raise RewardOptionError(str(e)) from None
    frames = options.pop("frames", "first")
    if batch_size < 0:
        raise RewardOptionError(f"reward.options.{name}.batch_size={batch_size} must be >= 0 (0: all at once)")
    if frames not in ("first", "mean"):
        raise RewardOptionError(f"reward.options.{name}.frames={frames!r} is not allowed; choose first or mean")
    obj = _target(name)
    kw = _split_options(name, obj, options)
    if inspect.isclass(obj):
        try:
            inst = obj(**kw)
        except ConfigError:
            raise
        except RewardError as e:  # e.g. a service that is down: one line naming the reward
            raise type(e)(f"reward {name!r}: {e}") from None
        return _Scorer(name, inst, {}, batch_size=batch_size, frames=frames)
    return _Scorer(name, obj, kw, batch_size=batch_size, frames=frames)


class RewardSet:
    """Several weighted scorers. `score(images, prompts, metadata) -> [N, K]` raw rewards (K
    scorers), fp32 on the CPU whatever device a scorer returns them on."""

    def __init__(self, names: list[str], weights: list[float], options: dict[str, dict] | None = None):
        if len(names) != len(weights):
            raise RewardError(f"{len(names)} rewards {names} but {len(weights)} weights {weights}")
        options = options or {}
        unknown = [k for k in options if k not in names]
        if unknown:
            raise RewardOptionError(f"reward.options.{unknown[0]} is set but {unknown[0]!r} is not in "
                                  f"reward.names={list(names)}; add it there or drop its options")
        self.names = list(names)
        self.weights = torch.tensor(weights, dtype=torch.float32)  # [K]
        self.scorers = [get_scorer(n, **(options.get(n) or {})) for n in names]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        return self.score_detail(images, prompts, metadata)[0]

    @torch.no_grad()
    def score_detail(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(raw rewards [N, K], {"<reward>/<field>": [N]} the scorers' extra per-sample fields)."""
        n = images.shape[0]
        if metadata is None:
            metadata = [{} for _ in range(n)]
        cols, detail = [], {}
        for name, fn in zip(self.names, self.scorers):
            try:
                r, d = fn.detailed(images, prompts, metadata)
            except ConfigError:
                raise  # a bad option found on first use: already one line
            except RewardError as e:  # a service's error: already says what and where
                raise type(e)(f"reward {name!r}: {e}") from None
            except Exception as e:  # noqa: BLE001 - re-raised with the reward's name
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} "
                                  f"(scoring {n} samples)") from e
            r = torch.as_tensor(r).detach().to("cpu", torch.float32).reshape(-1)  # rewards live on the CPU
            if r.numel() != n:
                raise RewardError(f"reward {name!r} returned {r.numel()} values for {n} samples; "
                                  "a scorer must return one value per image")
            bad = int((~torch.isfinite(r)).sum())
            if bad:
                raise RewardError(f"reward {name!r} returned NaN/inf for {bad} of {n} samples; "
                                  "fix the scorer (nothing was written to the weights)")
            cols.append(r)
            for k, v in d.items():
                if v.numel() != n:
                    raise RewardError(f"reward {name!r} returned {v.numel()} values of its detail field {k!r} "
                                      f"for {n} samples; a detail field holds one value per image")
                detail[f"{name}/{k}"] = v
        return torch.stack(cols, dim=1), detail  # [N, K]

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Weighted sum Σ_k w_k r_k → [N]."""
        return raw @ self.weights
