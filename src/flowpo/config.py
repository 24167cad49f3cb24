"""Run configuration: the schema's dataclasses (`flowpo.config_schema`, re-exported here) loaded
from defaults ← preset ← YAML ← `key.path=value` overrides, type-coerced and checked.

Every field's docstring (the string literal under it) is its help text (`describe`, `flowpo
config`). Validation names the key, the bad value and what is allowed, and raises `ConfigError`
(the CLI prints it as one line).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from flowpo.config_schema import (  # noqa: F401 - re-exported: flowpo.config.Config etc.
    RESOLVED_KEYS, AdvantageConfig, Config, EvalConfig, LogConfig, LossConfig, ModelConfig, ObjectiveConfig, PlanConfig,
    ReplayConfig, RewardConfig, SampleConfig, SolverConfig, TrainConfig,
)
from flowpo.errors import ConfigError  # noqa: F401 - re-exported: flowpo.config.ConfigError
from flowpo.errors import show
from flowpo.config_yaml import safe_yaml  # noqa: F401  (config's YAML reader)

INT_LIMIT = 2 ** 63
"""Integer keys hold values in (-2**63, 2**63): what torch, numpy and the seed streams take."""

CHOICES: dict[str, str] = {
    "model.kind": "flowpo.policy.registry:POLICY_KINDS",
    "sample.kernel": "flowpo.sde:KERNELS",
    "plan.kind": "flowpo.plans:PLANS",
    "solver.kind": "flowpo.solvers:TAILS",
    "advantage.kind": "flowpo.advantages:ESTIMATORS",
    "objective.kind": "flowpo.objectives:OBJECTIVES",
}
"""Fields whose allowed values are the keys of a part's registry (the registries are the only list)."""


def choices(key: str) -> list[str]:
    """Allowed values of a registry-backed field `key` (see CHOICES)."""
    import importlib

    mod, _, attr = CHOICES[key].partition(":")
    return list(getattr(importlib.import_module(mod), attr))


# ----------------------------------------------------------------------------- building


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type hint `hint`; convert YAML/str forms; raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X], X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_s = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={show(value)} is not allowed; choose one of {list(args)}{hint_s}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={show(value)} is not a boolean; use true or false")
    if hint is int:
        return _as_int(key, value)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={show(value)} is not a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={show(value)} is not a number") from None
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{key}={show(value)} is out of range; give a finite number") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}={show(value)} is not a finite number")
        return f
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}={show(value)} is not a string")
        return value
    if hint is typing.Any:
        return value
    if origin is dict:
        if isinstance(value, str):
            try:
                value = safe_yaml(value, key) if value.strip() else {}
            except yaml.YAMLError:
                value = None
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={show(value)} is not a mapping; write it as {key}.<key>=value or a YAML mapping")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            try:
                value = safe_yaml(value, key) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            except yaml.YAMLError:
                raise ConfigError(f"{key}={show(value)} is not a list; write it as [a, b] or a,b") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={show(value)} is not a list")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}={show(value)} needs {len(args)} values")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _as_int(key: str, value: Any) -> int:
    """An integer kept exact (12345678901234567 stays itself: never through a float), from an int,
    an integral float (5.0, 1e3) or a string of either; within ±2**63."""
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise ConfigError(f"{key}={show(value)} is not an integer")
    v: int | None = None
    if isinstance(value, int):
        v = value
    else:
        text = value.strip() if isinstance(value, str) else None
        if text is not None:
            try:
                v = int(text, 0) if text[:2].lower() in ("0x", "0o", "0b") else int(text)
            except ValueError:
                v = None
        if v is None:
            try:
                f = float(value)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{key}={show(value)} is not an integer") from None
            if not math.isfinite(f) or f != int(f):
                raise ConfigError(f"{key}={show(value)} is not an integer")
            if abs(f) >= 2 ** 53:  # a float this large is no longer exact: refuse rather than round
                raise ConfigError(f"{key}={show(value)} is out of range for an integer written as a float; "
                                  "write it out in digits (below 2**63)")
            v = int(f)
    if not -INT_LIMIT < v < INT_LIMIT:
        raise ConfigError(f"{key}={show(value)} is out of range; integers here lie within ±(2**63 - 1)")
    return v


_REMOVED = {"replay.enabled": "replay.enabled was removed: replay is on when replay.k > 0 (set replay.k=1 "
                               "to turn it on, replay.k=0 to turn it off)"}


_LEGACY_TRUNCATION = {"truncate_sigma": "sigma", "truncate_fraction": "fraction"}
"""Keys of plan.* and replay.* before truncation was one choice field (truncate + truncate_at):
still read (old run folders' config.yaml, users' YAML files), each setting the choice it names;
a null turns truncation off only if it was that choice (so the old pair reads as it meant)."""


def _legacy_truncation(obj: Any, name: str, value: Any) -> None:
    kind = _LEGACY_TRUNCATION[name]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if obj.truncate == kind:
            obj.truncate = "none"
        return
    obj.truncate, obj.truncate_at = kind, value


def _unknown_key(prefix: str, name: str, allowed: list[str]) -> ConfigError:
    if f"{prefix}{name}" in _REMOVED:
        return ConfigError(_REMOVED[f"{prefix}{name}"])
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    full = show(f"{prefix}{name}")[1:-1]
    if close:
        return ConfigError(f"unknown config key '{full}'; did you mean {prefix + close[0]!r}?")
    return ConfigError(f"unknown config key '{full}'; allowed under {prefix or 'the top level'}: {sorted(allowed)}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        if k in _LEGACY_TRUNCATION and "truncate" in names:
            _legacy_truncation(obj, k, v)
            k, v = "truncate_at", obj.truncate_at  # (coerced and checked below like any value)
        if k not in names:
            raise _unknown_key(prefix, str(k), names)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix}{k} must be a mapping of its fields, got {show(v)}")
            _apply(cur, v, f"{prefix}{k}.")
        else:
            key = f"{prefix}{k}"
            val = _coerce(key, v, hints[k])
            if isinstance(val, dict) and isinstance(cur, dict):  # mappings merge (reward.options.<name>.<key>)
                val = {**cur, **{n: {**cur[n], **o} if isinstance(o, dict) and isinstance(cur.get(n), dict) else o
                                 for n, o in val.items()}}
            if key in CHOICES and val not in choices(key):
                allowed = choices(key)
                close = difflib.get_close_matches(str(val), allowed, n=1)
                hint_s = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{key}={show(val)} is not allowed; choose one of {allowed}{hint_s}")
            setattr(obj, k, val)


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set `a.b.c` to `value` (a string from the command line or a YAML value).

    `reward.options.<name>.<key>`: <name> may itself hold dots (a dotted-path scorer
    `pkg.mod:fn`); the option is the last part."""
    parts = dotted.split(".")
    if parts[:2] == ["reward", "options"] and len(parts) > 4:
        parts = parts[:2] + [".".join(parts[2:-1]), parts[-1]]
    nested: dict = {}
    d = nested
    for p in parts[:-1]:
        d[p] = {}
        d = d[p]
    if isinstance(value, str) and value != "":
        try:
            value = safe_yaml(value, dotted)  # "5" → 5, "[a, b]" → list, "null" → None
        except yaml.YAMLError:
            pass  # keep the raw string; type checking below names the key if it is wrong
    d[parts[-1]] = value
    _apply(cfg, nested)


def to_dict(cfg: Config) -> dict:
    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(dataclasses.asdict(cfg))


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> Config:
    """Range and cross-field checks (flowpo.config_checks); raises ConfigError naming the key."""
    from flowpo.config_checks import check  # imports flowpo.errors only: no import circle

    check(cfg)
    return cfg


CONFIG_FILE_LIMIT = 16 << 20
"""Largest config file read (a run's config.yaml with a long σ grid is a few KB)."""


def load(config_file: str | None = None, preset: str | None = None,
         overrides: list[str] | None = None, *, keep_resolved: bool = False) -> Config:
    """Defaults ← preset ← YAML file ← `key=value` overrides, then validate.

    A run's config.yaml lists under `resolved` the keys the run filled in (its σ grid, its
    learning-rate horizon). keep_resolved=False (a new run seeded from that file) resets them to
    null so they follow this run's steps, model and budget; the run folder's own readers
    (--resume, eval, sample) keep them."""
    cfg = Config()
    data: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"config file {show(config_file)} does not exist; pass an existing YAML file "
                              "(see configs/)")
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ConfigError(f"config file {show(config_file)} is {kind}; pass a YAML file (see configs/)")
        if path.stat().st_size > CONFIG_FILE_LIMIT:
            raise ConfigError(f"config file {show(config_file)} has {path.stat().st_size:,} bytes; a config is a few "
                              f"KB (at most {CONFIG_FILE_LIMIT:,}): pass a YAML config file")
        try:
            data = safe_yaml(path.read_text(encoding="utf-8-sig"), f"config file {show(config_file)}") or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"config file {show(config_file)} is not valid YAML{where}: "
                              f"{getattr(e, 'problem', None) or e}; fix the file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {show(config_file)} is not UTF-8 text; pass a YAML file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {show(config_file)} must hold a YAML mapping of sections")
    preset = preset or data.pop("preset", None)
    data.pop("preset", None)
    if preset:
        apply_preset(cfg, preset)
    _apply(cfg, data)
    if not keep_resolved:
        for key in cfg.resolved:
            if key in RESOLVED_KEYS:
                set_key(cfg, key, None)
        cfg.resolved = []
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {show(ov)} must look like key.path=value, e.g. train.iterations=5")
        k, v = ov.split("=", 1)
        set_key(cfg, k.strip(), v)
    return validate(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return validate(cfg)


def apply_preset(cfg: Config, name: str) -> Config:
    """Set the fields of preset `name` (flowpo.presets.PRESETS) on `cfg`."""
    from flowpo.presets import PRESETS  # plain data: presets import nothing from flowpo

    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {show(name)}{hint}; available: {sorted(PRESETS)} (flowpo presets)")
    for k, v in PRESETS[name].overrides.items():
        set_key(cfg, k, v)
    cfg.preset = name
    return cfg


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (read from its source)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # pragma: no cover - no source available
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "str"
    if origin is dict:
        return "mapping"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def describe(cfg: Config) -> list[tuple[str, str, Any, list, str]]:
    """Every leaf key of `cfg` → (key, type, value, allowed values or [], help text)."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        hints, docs = _hints(type(obj)), _field_docs(type(obj))
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(val):
                walk(val, key + ".")
                continue
            hint = hints[f.name]
            lit = [a for a in (typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,))
                   if typing.get_origin(a) is Literal]
            allowed = choices(key) if key in CHOICES else (list(typing.get_args(lit[0])) if lit else [])
            out.append((key, _type_name(hint), list(val) if isinstance(val, tuple) else val, allowed,
                        docs.get(f.name, "")))

    walk(cfg, "")
    return out
