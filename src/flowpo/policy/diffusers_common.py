"""What the diffusers-backed policies (sd3.py, flux.py, qwen_image.py, wan.py) share beyond plumbing: no RL logic.

- `TrainableTransformer`: what is trained (LoRA via peft, or the full transformer), the frozen
  reference (`disable_adapter`), trainable state dicts, saving in diffusers' LoRA format with its
  config so that α ≠ r reloads at the right scale (scale = α / r).
- `DiffusersPolicy`: the base class of the adapters: loading, device/dtype placement, the
  pipeline scheduler's σ grid, true CFG's gradient option, and the `Policy` members that only
  delegate to `TrainableTransformer`.
Loading, dtypes, placement, decoding and the prompt cache are in `pipeline_io.py` (re-exported).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from pathlib import Path
from typing import ClassVar, Iterator, TypeVar

import torch
from torch import nn

from flowpo.policy.base import Cond
from flowpo.policy.pipeline_io import (  # noqa: F401 - re-exported for the adapters and tests
    INSTALL_HINT, Mode, PromptCache, autocast, cast_floating, check_pipeline_folder, freeze_eval, image_size,
    load_pipeline, place_frozen, require, resolve_dtype, set_gradient_checkpointing, vae_decode,
)


P = TypeVar("P", bound="DiffusersPolicy")


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

    @property
    def reference_module(self) -> nn.Module | None:
        """The frozen reference copy in full mode (None in LoRA mode: adapters off)."""
        return self._trainable.reference

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

    def negative(self, cond: Cond) -> Cond:
        """The unconditional rows of true CFG for the rows of `cond` (flowpo.guided):
        `negative_prompt`'s conditioning, once per row."""
        n = next(iter(cond.values())).shape[0]
        return {k: v.to(self.device).expand(n, *v.shape[1:]) for k, v in self._negative_cond().items()}

    def guide(self, v_u: torch.Tensor, v_c: torch.Tensor, guidance: float) -> torch.Tensor:
        """The guided velocity from the two branches' outputs [N, *D] (what `velocity` applies)."""
        return self._guided(v_u, v_c, guidance)

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
