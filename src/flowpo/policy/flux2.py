"""FLUX.2 [dev] and [klein] behind the `Policy` interface (text-to-image).

    policy = Flux2Policy.from_pretrained("/models/FLUX.2-klein-base-9B", dtype="bf16", resolution=1024)
    v = policy.velocity(x, sigma, policy.encode_prompts(prompts), guidance=4.0)

Source: diffusers `Flux2Pipeline` ([dev], Mistral-3 text encoder) and `Flux2KleinPipeline` ([klein],
Qwen3 text encoder), 0.42, and Black Forest Labs' FLUX.2 release (bfl.ai/blog/flux-2). Nothing copied.

Latent. The pipeline's state is the VAE latent after a 2×2 patchify (channels ×4) and the VAE's
batch-norm normalisation: x = (patchify(z) − μ_bn) / √(σ²_bn + ε), x ∈ [N, 4C, H/16, W/16]. That is
the policy's latent (the noise x(σ=1) ~ N(0, I) in this space, as `prepare_latents` draws it).
The transformer reads it as tokens [N, h·w, 4C] (row-major) with 4-axis position ids (t, h, w, l) =
(0, i, j, 0); text tokens get ids (0, 0, 0, k). `decode` undoes the normalisation and the patchify.

Time: the pipeline hands the transformer t/1000 = σ. Convention x_σ = (1−σ)x0 + σε, v = ε − x0.

Schedule, as the pipelines: sigmas linspace(1, 1/T, T) to FlowMatchEuler with the dynamic shift
σ ↦ e^μ / (e^μ + 1/σ − 1), where μ = `compute_empirical_mu(S, T)` depends on the token count S and
on the step count T (a line in T fitted between T = 10 and T = 200 for S ≤ 4300; 1.6927e-4·S + 0.4567
above).

Guidance. [dev]: guidance-distilled, g enters through the guidance embedding, one row per sample.
[klein] base: true CFG v_u + g·(v_c − v_u) with the empty negative prompt (the pipeline applies it for
g > 1; the policy for g ≠ 1); the step-distilled [klein] (`is_distilled`) has no CFG: guidance must
be 1.

Text. [klein]: the pipeline's own `encode_prompt` (Qwen3 chat template without thinking, padded to
`max_sequence_length`, hidden layers (9, 18, 27) stacked along features). [dev]: Mistral-3 layers
(10, 20, 30) the same way, but the inputs are made here from the tokenizer: in the real folder
`tokenizer/` is a PixtralProcessor, which transformers 5 builds only with torchvision (never a
flowpo dependency). For text-only prompts the processor's `apply_chat_template` is ProcessorMixin's
generic path: render the chat template, then call the tokenizer, adding special tokens only when
the rendered text does not start with the BOS token. `mistral_inputs` does exactly that with the
tokenizer alone (AutoTokenizer on `tokenizer/`), and `from_pretrained` loads the pipeline with
that tokenizer in place of the processor (tests/test_flux2.py checks the ids against
ProcessorMixin's path). Both keep the padded tokens (no text mask), as the pipelines.
Reference-image conditioning (FLUX.2 editing) is not supported here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import (
    DiffusersPolicy, Mode, autocast, check_pipeline_folder, image_size, load_pipeline, require, resolve_dtype,
)

# Double blocks: attention on both streams and both feed-forwards; single blocks: the fused qkv+MLP input.
FLUX2_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
)
PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's μ(S, T): linear in S, and for S ≤ 4300 interpolated linearly in T between the
    fits at T = 10 and T = 200 (BFL's flux2 sampling code; diffusers' function of the same name)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + m_200 - 200.0 * slope)


def mistral_inputs(tokenizer, prompts: list[str], system_message: str, max_length: int) -> dict:
    """input_ids / attention_mask [N, max_length] that `PixtralProcessor.apply_chat_template` gives
    Flux2Pipeline for text-only messages, from the tokenizer alone (no torchvision)."""
    messages = [[{"role": "system", "content": [{"type": "text", "text": system_message}]},
                 {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]
    texts = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    bos = tokenizer.bos_token
    add_special = not (bos is not None and texts[0].startswith(bos))
    return tokenizer(texts, add_special_tokens=add_special, padding="max_length", truncation=True,
                     max_length=max_length, return_tensors="pt")


class Flux2Policy(DiffusersPolicy):
    """A Flux2Pipeline ([dev]) or Flux2KleinPipeline ([klein]) transformer as the policy.

    Args: as `FluxPolicy` (dtype, mode, lora_rank, lora_alpha, lora_targets, resolution,
        gradient_checkpointing, device, max_sequence_length, prompt_cache_size, cfg_grad), plus
        text_encoder_out_layers: hidden layers of the text encoder stacked into the prompt
            embedding; None = the pipeline's ([dev] (10, 20, 30), [klein] (9, 18, 27)).
    """

    pipeline_class_name = "Flux2KleinPipeline"  # or Flux2Pipeline: `from_pretrained` reads the folder
    model_kind = "flux2"
    default_lora_targets = FLUX2_LORA_TARGETS
    frozen_components = ("text_encoder", "vae")

    def __init__(
        self,
        pipe,
        *,
        dtype: str | torch.dtype = "fp32",
        mode: Mode = "lora",
        lora_rank: int = 64,
        lora_alpha: float = 128,
        lora_targets: list[str] | None = None,
        resolution: int | tuple[int, int] | None = None,
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 512,
        prompt_cache_size: int = 1024,
        cfg_grad: str = "conditional",
        text_encoder_out_layers: list[int] | tuple[int, ...] | None = None,
    ):
        self.variant = "dev" if type(pipe).__name__ == "Flux2Pipeline" else "klein"
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        self.text_encoder_out_layers = tuple(text_encoder_out_layers or ((10, 20, 30) if self.variant == "dev"
                                                                          else (9, 18, 27)))
        layers = pipe.text_encoder.config.get_text_config().num_hidden_layers
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in self.text_encoder_out_layers) \
                or max(self.text_encoder_out_layers) > layers:
            raise ValueError(f"model.options.text_encoder_out_layers={list(self.text_encoder_out_layers)}: the text "
                             f"encoder has {layers} layers (hidden states 0..{layers})")
        super().__init__(
            pipe, dtype=dtype, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
            gradient_checkpointing=gradient_checkpointing, device=device, max_sequence_length=max_sequence_length,
            prompt_cache_size=prompt_cache_size, cfg_grad=cfg_grad,
        )
        self.has_guidance_embedding = bool(pipe.transformer.config.guidance_embeds)
        scale = pipe.vae_scale_factor
        self.height, self.width = image_size(pipe, resolution, 2 * scale)
        self.latent_shape = (pipe.transformer.config.in_channels, self.height // (2 * scale), self.width // (2 * scale))

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> "Flux2Policy":
        """Load a local Flux2Pipeline or Flux2KleinPipeline folder (never the hub). [dev]: the
        tokenizer is loaded as a tokenizer (AutoTokenizer on `tokenizer/`), not as the
        PixtralProcessor that model_index.json names."""
        import inspect

        inspect.signature(cls).bind(None, **options)  # TypeError on an unknown option, before loading
        folder = Path(path).expanduser()
        try:
            found = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            found = None  # check_pipeline_folder names what is wrong with the folder
        if found is not None and found not in PIPELINES:
            raise ValueError(f"model.kind='flux2' expects a Flux2Pipeline or Flux2KleinPipeline folder, but "
                             f"{folder / 'model_index.json'} declares {found!r}; set model.kind to the matching kind")
        name = found if found in PIPELINES else PIPELINES[1]
        check_pipeline_folder(path, name, cls.model_kind)  # errors name the fix (missing, not a pipeline)
        dtype = resolve_dtype(options.get("dtype", "fp32"))
        if name != "Flux2Pipeline":
            return cls(load_pipeline(name, folder, cls.model_kind, dtype), **options)
        tok = require("transformers").AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        if not tok.chat_template:
            raise ValueError(f"{folder / 'tokenizer'} has no chat template (chat_template.jinja or "
                             "tokenizer_config.json's chat_template); copy the one of the FLUX.2 [dev] folder")
        pipe = load_pipeline(name, folder, cls.model_kind, dtype, tokenizer=None)  # None: the processor is skipped
        pipe.register_modules(tokenizer=tok)
        return cls(pipe, **options)

    # -- Policy interface ---------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """{"prompt_embeds": [N, L, 3·D] stacked hidden layers, L = max_sequence_length}."""
        return self._prompts.get(prompts)

    def evals_per_row(self, guidance: float) -> int:
        """2 with [klein]'s true CFG at g ≠ 1; 1 for [dev] (guidance embedding) and the distilled
        [klein] (no CFG: `velocity` refuses g ≠ 1, and flowpo.guided never splits it)."""
        return 1 if (guidance == 1.0 or self.variant == "dev" or self.is_distilled) else 2

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        embeds = cond["prompt_embeds"]
        if self.variant == "dev":
            g = torch.full((n,), float(guidance), dtype=torch.float32, device=x.device)
            return self._transformer(x, sigma, embeds, g)
        if guidance == 1.0:
            return self._transformer(x, sigma, embeds, None)
        if self.is_distilled:
            raise ValueError(f"guidance={guidance}: this FLUX.2 [klein] folder is step-distilled (is_distilled: no "
                             "CFG); set sample.guidance and eval.guidance to 1.0")
        neg = self._negative_cond()["prompt_embeds"].to(embeds.device).expand(n, -1, -1)
        v_u, v_c = self._transformer(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg, embeds]),
                                     None).chunk(2)
        return self._guided(v_u, v_c, guidance)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 4C, h, w] → images [N, 3, H, W] fp32 in [0, 1]: undo the batch-norm, unpatchify, decode."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1).to(x.device)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device)
        z = x.float() * std + mean
        n, c4, h, w = z.shape
        z = z.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, 2 * h, 2 * w)
        param = next(vae.parameters())
        images = vae.decode(z.to(param.device, param.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- internals ----------------------------------------------------------------------------

    def _timestep_kwargs(self, T: int) -> dict:
        """As the FLUX.2 pipelines: sigmas linspace(1, 1/T, T) (unless the scheduler makes flow
        sigmas itself) and μ = compute_empirical_mu(S, T)."""
        kw: dict = {"mu": compute_empirical_mu(self._image_seq_len(), T)}
        if not self.pipe.scheduler.config.get("use_flow_sigmas", False):
            kw["sigmas"] = np.linspace(1.0, 1.0 / T, T)
        return kw

    def _image_seq_len(self) -> int:
        return self.latent_shape[1] * self.latent_shape[2]

    def _encode(self, prompts: list[str]) -> Cond:
        if self.variant == "klein":
            embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                                max_sequence_length=self.max_sequence_length,
                                                text_encoder_out_layers=self.text_encoder_out_layers)
            return {"prompt_embeds": embeds}
        inputs = mistral_inputs(self.pipe.tokenizer, list(prompts), self.pipe.system_message, self.max_sequence_length)
        out = self.pipe.text_encoder(input_ids=inputs["input_ids"].to(self.device),
                                     attention_mask=inputs["attention_mask"].to(self.device),
                                     output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in self.text_encoder_out_layers], dim=2)  # [N, L, 3, D]
        return {"prompt_embeds": stacked.flatten(2)}  # [N, L, 3·D], layer-major within a token

    def _transformer(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, guidance) -> torch.Tensor:
        """x [M, 4C, h, w] → the transformer's velocity [M, 4C, h, w] fp32."""
        m, c, h, w = x.shape
        tokens = x.reshape(m, c, h * w).permute(0, 2, 1)  # [M, S, 4C]
        zero = torch.zeros(1, device=x.device)
        img_ids = torch.cartesian_prod(zero, torch.arange(h, device=x.device).float(),
                                       torch.arange(w, device=x.device).float(), zero)  # [S, 4]
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(embeds.shape[1], device=x.device).float())
        with autocast(self.device, self.dtype):
            out = self._trainable.active(
                hidden_states=tokens.to(self.dtype),
                encoder_hidden_states=embeds.to(self.dtype),
                timestep=sigma,  # the pipeline's t / 1000
                img_ids=img_ids.expand(m, -1, -1),
                txt_ids=txt_ids.expand(m, -1, -1),
                guidance=guidance,
                return_dict=False,
            )[0]
        return out.float().permute(0, 2, 1).reshape(m, c, h, w)
