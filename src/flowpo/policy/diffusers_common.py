"""Shared plumbing for the diffusers-backed policies (sd3.py, flux.py, wan.py): no RL logic.

- `load_pipeline`: open a local diffusers folder with errors that name the fix; never the hub.
- `resolve_dtype` / `autocast`: the network runs in bf16/fp16 under autocast; callers return fp32.
- `TrainableTransformer`: what is trained (LoRA via peft, or the full transformer), the frozen
  reference (`disable_adapter`), trainable state dicts, saving in diffusers' LoRA format with its
  config so that α ≠ r reloads at the right scale (scale = α / r).
- `PromptCache`: text-encoder outputs keyed by prompt string (bounded, least recently used out).
- `DiffusersPolicy`: the base class of the three adapters: loading, device/dtype placement and the
  `Policy` members that only delegate to `TrainableTransformer`.

diffusers, transformers and peft are imported lazily (DESIGN.md: `import flowpo` stays fast).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Literal, TypeVar

import torch
from torch import nn

from flowpo.policy.base import Cond

INSTALL_HINT = "pip install flowpo[diffusers]"
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
Mode = Literal["lora", "full"]


def require(module: str):
    """Import an optional dependency, or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"flowpo's diffusers policies need the optional dependency '{module}' ({err}); "
            f"install it with `{INSTALL_HINT}`"
        ) from err


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or the torch dtype itself) → torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"model.dtype={dtype!r} is not supported; use one of 'fp32', 'bf16', 'fp16'")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the network's forward pass; a no-op at fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_pipeline_folder(path: str | Path, expected_class: str, kind: str) -> Path:
    """Validate a local diffusers pipeline folder before anything tries to load it."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"model.path={str(path)!r} does not exist; point model.path at a local diffusers folder "
            f"(e.g. one downloaded beforehand with `huggingface-cli download <repo> --local-dir DIR`); "
            "flowpo never downloads weights"
        )
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise FileNotFoundError(
            f"model.path={str(path)!r} is not a diffusers pipeline folder; expected model_index.json "
            f"in it (the folder that holds model_index.json, transformer/, vae/, text_encoder/, ...)"
        )
    try:
        meta = json.loads(index.read_text())
    except ValueError as e:
        raise ValueError(f"{index} is not valid JSON ({e}); the folder is damaged: download the pipeline "
                         "again") from None
    found = meta.get("_class_name") if isinstance(meta, dict) else None
    if found is None:
        raise ValueError(f"{index} has no _class_name; it is not a diffusers pipeline index: point model.path "
                         "at the folder of a saved pipeline")
    if found != expected_class:
        raise ValueError(
            f"model.kind={kind!r} expects a {expected_class} folder, but {index} declares {found!r}; "
            "set model.kind to the matching kind or point model.path at the right folder"
        )
    return folder


def load_pipeline(pipeline_class_name: str, path: str | Path, kind: str, dtype: torch.dtype):
    """`<PipelineClass>.from_pretrained(path)` from local files only, weights in `dtype`."""
    folder = check_pipeline_folder(path, pipeline_class_name, kind)
    diffusers = require("diffusers")
    require("transformers")
    pipeline_cls = getattr(diffusers, pipeline_class_name)
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns); older ones only know the old.
    major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (0, 42) else "torch_dtype"
    return pipeline_cls.from_pretrained(str(folder), local_files_only=True, **{dtype_kw: dtype})


def cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """module.to(dtype), skipped when its floating parameters already have it (diffusers warns on
    every `.to(dtype)` of a ModelMixin)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)


def freeze_eval(*modules: nn.Module | None) -> None:
    """eval() and requires_grad=False: components built from configs start in train mode."""
    for module in modules:
        if module is not None:
            module.eval()
            module.requires_grad_(False)


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Toggle diffusers' activation checkpointing on a ModelMixin."""
    if enabled:
        module.enable_gradient_checkpointing()
    else:
        module.disable_gradient_checkpointing()


class TrainableTransformer:
    """The trained part of a diffusers pipeline: a LoRA on the transformer, or all of it.

    mode="lora": base weights in `dtype` and frozen; LoRA A/B matrices (peft, via diffusers'
      `add_adapter`) in fp32; B starts at 0, so the initial policy equals the base model.
      The reference policy is the same network with adapters disabled.
    mode="full": the transformer's weights are fp32 master weights (the forward runs under
      autocast); the reference policy is a frozen copy in `dtype` taken at construction.

    `module` is the transformer the forward pass calls; a trainer may replace it with a
    DDP/FSDP wrapper of `transformer`. Names in state dicts are `transformer`'s own.
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        mode: Mode,
        dtype: torch.dtype,
        lora_rank: int,
        lora_alpha: float,
        lora_targets: list[str],
        gradient_checkpointing: bool,
    ):
        if mode not in ("lora", "full"):
            raise ValueError(f"model.mode={mode!r} is not supported; use 'lora' or 'full'")
        self.mode = mode
        self.transformer = transformer
        self.reference: nn.Module | None = None
        self._disabled = False
        freeze_eval(transformer)
        if mode == "lora":
            if lora_rank <= 0:
                raise ValueError(f"model.lora_rank={lora_rank} must be a positive integer")
            peft = require("peft")
            cast_floating(transformer, dtype)
            config = peft.LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha,
                target_modules=list(lora_targets),
                init_lora_weights=True,  # A ~ Kaiming, B = 0: the LoRA starts as the identity edit
            )
            try:
                transformer.add_adapter(config)
            except ValueError as err:
                raise ValueError(
                    f"model.lora_targets={list(lora_targets)} matched no module of "
                    f"{type(transformer).__name__}; give module-name suffixes such as 'attn.to_q'"
                ) from err
            for name, param in transformer.named_parameters():
                if ".lora_" in name:
                    param.data = param.data.float()
                    param.requires_grad_(True)
        else:
            self.reference = copy.deepcopy(transformer)
            cast_floating(self.reference, dtype)
            freeze_eval(self.reference)
            cast_floating(transformer, torch.float32)
            transformer.requires_grad_(True)
        transformer.eval()
        set_gradient_checkpointing(transformer, gradient_checkpointing)
        self.module: nn.Module = transformer
        # Fixed at construction: peft toggles requires_grad while adapters are disabled.
        self._names = [n for n, p in transformer.named_parameters() if p.requires_grad]

    @property
    def active(self) -> nn.Module:
        """The module to call now: the reference inside `disable_adapter()` for full mode."""
        return self.reference if (self._disabled and self.reference is not None) else self.module

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        if self._disabled:  # nested: already the reference
            yield
            return
        self._disabled = True
        if self.mode == "lora":
            self.transformer.disable_adapters()
        try:
            yield
        finally:
            if self.mode == "lora":
                self.transformer.enable_adapters()
            self._disabled = False

    def _params(self) -> dict[str, nn.Parameter]:
        named = dict(self.transformer.named_parameters())
        return {n: named[n] for n in self._names}

    def parameters(self) -> list[nn.Parameter]:
        return list(self._params().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._params().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self._params()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(
                f"trainable state does not match this policy (mode={self.mode!r}): "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])

    def lora_metadata(self) -> dict:
        """The LoraConfig as a dict (r, lora_alpha, target_modules, ...): stored in the file so
        `load_lora_weights` rebuilds the same scale α / r."""
        config = self.transformer.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}

    def save(self, directory: str | Path, pipeline_cls: type) -> None:
        """LoRA: `pytorch_lora_weights.safetensors` loadable by `pipeline.load_lora_weights(directory)`.
        Full: the transformer in diffusers format under `directory/transformer`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.mode == "lora":
            from peft.utils import get_peft_model_state_dict

            layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
            pipeline_cls.save_lora_weights(
                save_directory=str(directory),
                transformer_lora_layers=layers,
                transformer_lora_adapter_metadata=self.lora_metadata(),
                safe_serialization=True,
            )
        else:
            self.transformer.save_pretrained(str(directory / "transformer"), safe_serialization=True)


class PromptCache:
    """Text-encoder outputs per prompt string; at most `capacity` prompts, least recent out.

    `encode(prompts)` receives the prompts not cached yet (unique, in order) and returns a dict of
    tensors with one row per prompt; `get` returns rows for `prompts` (duplicates allowed) stacked.
    """

    def __init__(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], capacity: int = 1024):
        if capacity < 1:
            raise ValueError(f"prompt cache capacity={capacity} must be at least 1")
        self._encode = encode
        self.capacity = capacity
        self._rows: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def get(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        todo = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        for start in range(0, len(todo), self.capacity):  # never evict rows of this call's batch
            chunk = todo[start : start + self.capacity]
            out = self._encode(chunk)
            for i, prompt in enumerate(chunk):
                self._rows[prompt] = {k: v[i].clone() for k, v in out.items()}
        rows = []
        for p in prompts:
            self._rows.move_to_end(p)
            rows.append(self._rows[p])
        result = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return result


def place_frozen(pipe, names: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> None:
    """Move the pipeline's non-trained components (text encoders, VAE) to `device`/`dtype`, frozen."""
    for name in names:
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)
            cast_floating(module, dtype)
            freeze_eval(module)


def image_size(pipe, resolution: int | tuple[int, int] | None, multiple: int) -> tuple[int, int]:
    """(height, width) in pixels; None → what the pipeline uses with no height/width given
    (`default_sample_size · vae_scale_factor`). Both must be divisible by `multiple`."""
    if resolution is None:
        side = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = side, side
    elif isinstance(resolution, int):
        height, width = resolution, resolution
    else:
        height, width = (int(r) for r in resolution)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"model.resolution={resolution!r} gives {height}×{width} px; height and width must be "
            f"positive multiples of {multiple} for this pipeline"
        )
    return height, width


@torch.no_grad()
def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, h, w] (the transformer's space) → images [N, 3, H, W] fp32 in [0, 1].

    z = latents / scaling_factor + shift_factor is what the VAE decoder expects.
    """
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    param = next(vae.parameters())
    images = vae.decode(z.to(device=param.device, dtype=param.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


P = TypeVar("P", bound="DiffusersPolicy")


class DiffusersPolicy:
    """What SD3Policy, FluxPolicy and WanPolicy share: a diffusers pipeline whose transformer is
    the policy (`TrainableTransformer`) and whose `frozen_components` are placed frozen.

    A subclass sets the class attributes, calls `super().__init__` with its keyword arguments
    (it owns their defaults and documents them), and implements `velocity`, `encode_prompts`
    and `_encode(prompts) -> Cond`. `evals_per_row` and `decode` below are the true-CFG, image
    versions; a subclass overrides them where it differs.
    """

    pipeline_class_name: ClassVar[str]  # e.g. "FluxPipeline": what `from_pretrained` loads
    model_kind: ClassVar[str]  # the `model.kind` that errors name, e.g. "flux"
    default_lora_targets: ClassVar[tuple[str, ...]]  # used when lora_targets is None
    frozen_components: ClassVar[tuple[str, ...]]  # pipeline attributes placed frozen on `device`
    negative_prompt: str = ""  # the unconditional prompt of true CFG

    def __init__(
        self,
        pipe,
        *,
        dtype: str | torch.dtype,
        mode: Mode,
        lora_rank: int,
        lora_alpha: float,
        lora_targets: list[str] | None,
        gradient_checkpointing: bool,
        device: str | torch.device,
        max_sequence_length: int,
        prompt_cache_size: int,
        cfg_grad: str = "conditional",
    ):
        if cfg_grad not in ("conditional", "both"):
            raise ValueError(f"cfg_grad={cfg_grad!r}; allowed: 'conditional' (Flow-GRPO), 'both'")
        self.cfg_grad = cfg_grad
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_sequence_length = max_sequence_length
        place_frozen(pipe, self.frozen_components, self.device, self.dtype)
        pipe.transformer.to(self.device)
        self._trainable = TrainableTransformer(
            pipe.transformer,
            mode=mode,
            dtype=self.dtype,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=list(lora_targets or self.default_lora_targets),
            gradient_checkpointing=gradient_checkpointing,
        )
        self._prompts = PromptCache(self._encode, prompt_cache_size)
        self._negative: Cond | None = None

    @classmethod
    def from_pretrained(cls: type[P], path: str | Path, **options) -> P:
        """Load a local `pipeline_class_name` folder (never the hub) and wrap it: `cls(pipe, **options)`.

        `options` are the keyword arguments of the subclass's `__init__`; they are checked against
        its signature before anything is loaded.
        """
        bound = inspect.signature(cls).bind(None, **options)  # TypeError on an unknown option
        bound.apply_defaults()
        dtype = resolve_dtype(bound.arguments["dtype"])
        return cls(load_pipeline(cls.pipeline_class_name, path, cls.model_kind, dtype), **options)

    # -- Policy interface -------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self._trainable.module

    @module.setter
    def module(self, wrapped: nn.Module) -> None:  # a DDP/FSDP wrapper of the transformer
        self._trainable.module = wrapped

    def evals_per_row(self, guidance: float) -> int:
        """True CFG: the unconditional and conditional rows at guidance ≠ 1, one row at 1."""
        return 1 if guidance == 1.0 else 2

    def sigmas(self, T: int, shift: float | None = None) -> torch.Tensor:
        """The pipeline scheduler's σ grid for T steps, as its own `__call__` sets it (a copy of the
        scheduler takes `set_timesteps` with `_timestep_kwargs(T)`: the dynamic-shift μ from this
        policy's latent token count, FLUX's explicit sigmas); `shift` is unused (the scheduler
        config's shift applies). fp32 [T + 1] on the CPU."""
        import copy

        sched = copy.deepcopy(self.pipe.scheduler)
        kw = self._timestep_kwargs(T)
        if "sigmas" in kw:
            sched.set_timesteps(sigmas=kw.pop("sigmas"), device="cpu", **kw)
        else:
            sched.set_timesteps(T, device="cpu", **kw)
        return sched.sigmas.detach().to("cpu", torch.float32).clone()

    def _timestep_kwargs(self, T: int) -> dict:
        """What the pipeline passes to `set_timesteps` besides T: μ when the scheduler shifts
        dynamically (from `_image_seq_len()` and the scheduler config's base/max shift)."""
        c = self.pipe.scheduler.config
        if not c.get("use_dynamic_shifting", False):
            return {}
        return {"mu": self._mu(self._image_seq_len(), default_max_shift=1.16)}

    def _mu(self, seq_len: int, default_max_shift: float) -> float:
        from flowpo.schedule import dynamic_shift_mu

        c = self.pipe.scheduler.config
        return dynamic_shift_mu(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                c.get("base_shift", 0.5), c.get("max_shift", default_max_shift))

    def _image_seq_len(self) -> int:
        """Latent tokens the transformer sees (patches of the latent)."""
        raise NotImplementedError

    def _guided(self, v_u: torch.Tensor, v_c: torch.Tensor, guidance: float) -> torch.Tensor:
        """v_u + g·(v_c − v_u); with cfg_grad='conditional' no gradient flows through v_u
        (Flow-GRPO's training), with 'both' through both branches. Values are the same."""
        if self.cfg_grad == "conditional":
            v_u = v_u.detach()
        return v_u + guidance * (v_c - v_u)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, H/8, W/8] → images [N, 3, H, W] fp32 in [0, 1]."""
        return vae_decode(self.pipe.vae, x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._trainable.parameters()

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        return self._trainable.disable_adapter()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._trainable.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._trainable.load_state_dict(state)

    def save_pretrained(self, directory: str) -> None:
        """LoRA: `<pipeline class>.load_lora_weights(directory)` loads it back (α kept).
        Full: `directory/transformer` in diffusers format."""
        self._trainable.save(directory, type(self.pipe))

    # -- internals --------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> Cond:
        """Text-encoder outputs for `prompts`, one row each (what `PromptCache` stores)."""
        raise NotImplementedError

    def _negative_cond(self) -> Cond:
        """`negative_prompt`'s embeddings (one row), encoded once: the unconditional row of CFG."""
        if self._negative is None:
            with torch.no_grad():
                self._negative = self._encode([self.negative_prompt])
        return self._negative
