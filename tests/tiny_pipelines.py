"""Tiny SD3 and FLUX diffusers pipelines with random weights, built entirely offline.

Every component comes from a small config (no hub access): transformer, VAE, CLIP/T5 text
encoders, and tokenizers whose vocabularies are written here in code. The pipelines have the
real classes and wiring of StableDiffusion3Pipeline / FluxPipeline, so the adapters exercise the
same code paths as with real weights, in seconds on a CPU.

    pipe = tiny_sd3_pipeline(seed=0)
    path = save_tiny(pipe, tmp_path / "sd3")     # a folder that from_pretrained(path) loads
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

# Text lengths: CLIP's is the tokenizer's model_max_length (77 in the real models); the T5 length
# is the `max_sequence_length` the policies pass (256 for SD3, 512 for FLUX in the real models).
CLIP_LENGTH = 77  # as the real CLIP tokenizers
T5_LENGTH = 12
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def clip_tokenizer(max_length: int = CLIP_LENGTH):
    """A CLIP BPE tokenizer over single characters (no merges): one token per character."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    vocab = {_CLIP_BOS: 0, _CLIP_EOS: 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A T5 unigram tokenizer over a handful of words and single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in ("a", "the", "cat", "dog", "red", "blue", "photo", "of", "on"):
        pieces.append(("▁" + word, -3.0))
    for ch in string.ascii_lowercase + string.digits:
        pieces.append((ch, -5.0))
        pieces.append(("▁" + ch, -5.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(_CLIP_BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(_CLIP_EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(_CLIP_EOS),
    )


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    # dropout 0.1 as in the real T5: a component left in train mode gives non-deterministic embeddings.
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, *, scaling_factor: float, shift_factor: float, quant_conv: bool):
    """A 2-level AutoencoderKL: 2x spatial compression (vae_scale_factor = 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: 2-layer MMDiT, 4-channel latents, default resolution 16×16 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    # SD3 concatenates the two CLIP hidden states (2·16 = 32 = T5 d_model = joint_attention_dim)
    # and the two CLIP projections (2·16 = 32 = pooled_projection_dim).
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tok, hidden=16, projection=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tok2, hidden=16, projection=16))
    text_encoder_3 = _t5_encoder(tok3, d_model=32)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    vae = _vae(4, scaling_factor=1.5305, shift_factor=0.0609, quant_conv=True)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok3,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline: 1 double + 1 single block, 4-channel latents packed into 16-channel tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tok, hidden=16, projection=16))
    text_encoder_2 = _t5_encoder(tok2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    vae = _vae(4, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok2,
    )


def save_tiny(pipe, directory: str | Path) -> str:
    """Write `pipe` as a diffusers folder (model_index.json + one subfolder per component)."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def tiny_wan_pipeline(seed: int = 0):
    """WanPipeline (Wan2.1 T2V): 2-layer WanTransformer3DModel, 4-channel latents, 8× spatial and
    4× temporal compression; 32×32 px, 5 frames → latents [4, 2, 4, 4]."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 2.0, 0.8, 1.0],
    )
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def brightness_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A stand-in reward for end-to-end runs: mean pixel value of each image, [N]."""
    return images.mean(dim=tuple(range(1, images.dim())))


# QwenImagePipeline's chat template (its `prompt_template_encode`) and the number of template tokens
# it drops before the prompt (`prompt_template_encode_start_idx`, 34 with the real Qwen2 tokenizer).
QWEN_TEMPLATE_WORDS = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
    "a red blue cat dog photo of on sign that reads hello world<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_TEMPLATE_DROP = 34


def qwen_tokenizer():
    """A byte-level BPE tokenizer (Qwen2Tokenizer, as the real one) trained here, offline, on the
    pipeline's template and a few words: every template word is one token, so the template prefix
    is 34 tokens as with the real tokenizer; any other text falls back to bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([QWEN_TEMPLATE_WORDS], trainer)
    tok = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    prefix = QWEN_TEMPLATE_WORDS.split("user\n")[0] + "user\n"
    assert len(tok(prefix)["input_ids"]) == QWEN_TEMPLATE_DROP, "template prefix must be 34 tokens"
    return tok


def tiny_qwen_image_pipeline(seed: int = 0):
    """QwenImagePipeline: 2-block QwenImageTransformer2DModel, a 2-layer Qwen2.5-VL text encoder
    (hidden 32; its vision tower is tiny and unused for text), 4-channel latents packed into
    16-channel 2×2 tokens, a 1-level AutoencoderKLQwenImage (2× compression: 16 px → [4, 8, 8]), and
    the real Qwen-Image scheduler config (dynamic exponential shift, shift_terminal 0.02)."""
    from diffusers import (
        AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    unused = len(tok) - 1  # vision token ids: never in text-only prompts of the tests
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
            temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0],
        ),
        image_token_id=unused, video_token_id=unused, vision_start_token_id=unused, vision_end_token_id=unused,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels × 2×2 patch
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = the text encoder's hidden size
        axes_dims_rope=(4, 6, 6),  # frame, row, col; sums to the head dim
    )
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.0],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image scheduler/scheduler_config.json
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )
