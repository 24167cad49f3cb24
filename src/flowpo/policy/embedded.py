"""The embedded default policy: the tiny digit flow model (`flowpo.models.FlowNet`) behind `Policy`.

Latents are the images themselves, x ∈ [-1, 1]^(1×16×16); `decode(x) = clamp((x + 1)/2, 0, 1)`.
Prompts are word ids (`flowpo.embedded.prompts.tokenize`); the null prompt is an all-PAD row.

Velocity with true classifier-free guidance (Ho & Salimans arXiv 2207.12598, eq. 6 in v-form):
    v = v_u + g·(v_c − v_u),
computed in one batched forward of 2N rows (cond rows, then null rows) when g ≠ 1, and a plain
forward of N rows when g = 1.

Fine-tuning modes:
- "lora": peft LoRA (Hu et al. arXiv 2106.09685), W' = W + (α/r)·B·A on `LORA_TARGETS`, B = 0 at
  start; base weights frozen; `disable_adapter()` switches the adapters off (the reference).
- "full": every weight trainable; a frozen copy of the initial weights is the reference.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from flowpo.embedded import prompts as P
from flowpo.embedded.flow_net import LORA_TARGETS, FlowNet, guided_velocity
from flowpo.policy.base import Cond

ASSETS = Path(__file__).resolve().parent.parent / "embedded" / "assets"


def load_flow_net(weights: str | Path | None = None) -> FlowNet:
    """A FlowNet with the shipped weights (`assets/flow.safetensors`) or those at `weights`."""
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else ASSETS / "flow.safetensors"
    if not path.is_file():
        hint = "run `flowpo pretrain` to create it" if weights is None else "pass an existing file"
        raise FileNotFoundError(f"embedded flow weights not found at {path}; {hint}")
    net = FlowNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


class EmbeddedPolicy:
    """`Policy` for the embedded 16×16 digit model (see module docstring)."""

    latent_shape = (1, 16, 16)

    def __init__(self, weights: str | None = None, mode: Literal["lora", "full"] = "lora",
                 lora_rank: int = 8, lora_alpha: float = 8.0, max_len: int = 8,
                 cfg_grad: Literal["conditional", "both"] = "conditional"):
        if mode not in ("lora", "full"):
            raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
        self.mode, self.lora_rank, self.lora_alpha, self.max_len = mode, lora_rank, lora_alpha, max_len
        self.cfg_grad = cfg_grad
        net = load_flow_net(weights)
        self._ref: FlowNet | None = None
        if mode == "lora":
            import peft

            net.requires_grad_(False)
            config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(LORA_TARGETS),
                                     lora_dropout=0.0)
            net = peft.inject_adapter_in_model(config, net)
        else:
            self._ref = copy.deepcopy(net).requires_grad_(False)
        self.module: nn.Module = net.eval()
        self._use_ref = False

    @property
    def reference_module(self) -> nn.Module | None:
        """The frozen copy that is the reference in full mode (None in LoRA mode: adapters off)."""
        return self._ref

    # ---- prompts, velocity, decoding -------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Cond:
        return {"tokens": P.tokenize(prompts, self.max_len)}  # [N, L]

    def _net(self) -> nn.Module:
        return self._ref if self._use_ref else self.module

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        """v_θ(x, σ | c) with true CFG: x [N, 1, 16, 16], sigma [N] → fp32 [N, 1, 16, 16]."""
        x, tokens = x.float(), cond["tokens"].to(x.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])  # [N]
        return guided_velocity(self._net(), x, sigma, tokens, guidance, detach_uncond=self.cfg_grad == "conditional")

    def negative(self, cond: Cond) -> Cond:
        """The unconditional rows of CFG for the rows of `cond` (flowpo.guided): all-PAD prompts."""
        return {"tokens": torch.full_like(cond["tokens"], P.PAD)}

    def guide(self, v_u: torch.Tensor, v_c: torch.Tensor, guidance: float) -> torch.Tensor:
        """v_u + g·(v_c − v_u) from the two branches (as `velocity`; v_u detached with cfg_grad=conditional)."""
        if self.cfg_grad == "conditional":
            v_u = v_u.detach()
        return (v_u + guidance * (v_c - v_u)).float()

    def sigmas(self, T: int, shift: float) -> torch.Tensor:
        """flowpo's grid σ = shift(linspace(1, 0, T + 1)) (flowpo.schedule.sigmas)."""
        from flowpo.schedule import sigmas

        return sigmas(T, shift)

    def evals_per_row(self, guidance: float) -> int:
        return 1 if guidance == 1.0 else 2

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, 1, 16, 16] in [-1, 1] → images [N, 1, 16, 16] in [0, 1] (fp32)."""
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ---- fine-tuning ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._trainable_named()]

    def _trainable_named(self) -> list[tuple[str, nn.Parameter]]:
        if self.mode == "lora":
            return [(n, p) for n, p in self.module.named_parameters() if "lora_" in n]
        return list(self.module.named_parameters())

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this context `velocity` is the frozen base (reference) policy."""
        if self.mode == "full":
            self._use_ref = True
            try:
                yield
            finally:
                self._use_ref = False
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.module.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (only the LoRA A/B matrices in lora mode), detached clones."""
        return {n: p.detach().clone() for n, p in self._trainable_named()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self._trainable_named())
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise KeyError(f"trainable state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def save_pretrained(self, directory: str) -> None:
        """Write `adapter.safetensors` (trainable tensors) and `adapter_config.json` into `directory`."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.trainable_state_dict().items()}, str(out / "adapter.safetensors"))
        config = {"model": "embedded", "mode": self.mode, "r": self.lora_rank, "lora_alpha": self.lora_alpha,
                  "target_modules": list(LORA_TARGETS), "max_len": self.max_len}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
