"""Tiny random-weight Z-Image, FLUX.2 ([dev] and [klein]) and Wan2.2 (A14B layout) pipelines, offline.

As `tiny_pipelines.py`: the real pipeline classes and wiring, every component from a small config,
tokenizers written here in code, so the adapters run the real code paths in seconds on a CPU.

    pipe = tiny_zimage_pipeline(seed=0)
    path = save_tiny(pipe, tmp_path / "zimage")
"""
from __future__ import annotations

import torch
from tiny_pipelines import _vae, qwen_tokenizer, t5_tokenizer

# A Qwen3-style chat template: what Z-Image (enable_thinking=True) and FLUX.2 [klein]
# (enable_thinking=False: an empty think block) render for a one-turn user message.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# A Mistral-3-style template (FLUX.2 [dev]): bos, the system prompt, the user turn; content items are
# lists of {"type": "text"} parts, as Flux2Pipeline's `format_input` builds them.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ c['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ c['text'] }}[/INST]{% endif %}{% endfor %}{% endfor %}"
)


def qwen3_tokenizer():
    tok = qwen_tokenizer()
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def mistral_tokenizer():
    """A byte-level BPE tokenizer with Mistral's <s>/</s>/<pad> and the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a red blue cat dog photo of on sign that reads hello world you are an AI"], trainer)
    from tokenizers.processors import TemplateProcessing

    bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def _qwen3(tok, layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def tiny_zimage_pipeline(seed: int = 0):
    """ZImagePipeline: a 2-layer ZImageTransformer2DModel (1 refiner layer each), a 2-layer Qwen3 text
    encoder (hidden 32), a 2× AutoencoderKL (16 px → latents [4, 8, 8]), Z-Image's static-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tok = qwen3_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    )
    vae = _vae(4, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)  # Z-Image's config
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=_qwen3(tok, 2, causal_lm=False),
                          tokenizer=tok, transformer=transformer)


def _flux2_parts(guidance_embeds: bool, text_dim: int):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=text_dim, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # batch-norm statistics as a trained VAE has them (not 0 / 1)
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    # FLUX.2's scheduler config: dynamic shift (μ from compute_empirical_mu), shift 3.0.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return transformer, vae, scheduler


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """Flux2KleinPipeline: 1 double + 1 single block, a 3-layer Qwen3ForCausalLM (use
    text_encoder_out_layers=(1, 2, 3): the real (9, 18, 27) need 28 layers), 2× AutoencoderKLFlux2
    (16 px → latents [16, 4, 4] after 2×2 patchify), no guidance embedding."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tok = qwen3_tokenizer()
    transformer, vae, scheduler = _flux2_parts(guidance_embeds=False, text_dim=3 * 32)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=_qwen3(tok, 3, causal_lm=True),
                              tokenizer=tok, transformer=transformer, is_distilled=is_distilled)


def tiny_flux2_dev_pipeline(seed: int = 0):
    """Flux2Pipeline ([dev]): as klein but a guidance embedding and a tiny 3-layer Mistral-3 (text
    encoder + unused Pixtral tower); the tokenizer is a plain fast tokenizer (the real folder holds a
    PixtralProcessor, which transformers 5 builds only with torchvision)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    tok = mistral_tokenizer()
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=4),
        image_token_index=len(tok) - 1, spatial_merge_size=1,
    )
    transformer, vae, scheduler = _flux2_parts(guidance_embeds=True, text_dim=3 * 32)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=Mistral3ForConditionalGeneration(config),
                         tokenizer=tok, transformer=transformer)


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.875):
    """WanPipeline in the Wan2.2 A14B layout: `transformer` (high noise) and `transformer_2` (low
    noise), boundary_ratio 0.875 (T2V-A14B's), UniPC multistep with flow_shift 3 (as the model card),
    a 2-layer UMT5, the Wan VAE (32×32 px, 5 frames → latents [4, 2, 4, 4])."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.0],
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=_wan_transformer(), transformer_2=_wan_transformer(), boundary_ratio=boundary_ratio)
