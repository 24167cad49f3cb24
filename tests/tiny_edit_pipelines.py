"""Tiny editing pipelines with random weights, built offline (as tests/tiny_pipelines.py):
FluxKontextPipeline and QwenImageEditPlusPipeline (2509; 2511 with zero_cond_t), source images,
and transformers' Qwen2VLProcessor built without its torchvision video processor (the reference
the policy's own Qwen2-VL image inputs are compared with).

    pipe = tiny_qwen_image_edit_pipeline(zero_cond_t=True)
    path = save_tiny_qwen_edit(pipe, tmp_path / "qwen_edit")   # with processor/preprocessor_config.json
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_pipelines import save_tiny, tiny_flux_pipeline



def tiny_flux_kontext_pipeline(seed: int = 0):
    """FluxKontextPipeline: the tiny FLUX components (guidance embedding) under the Kontext pipeline."""
    from diffusers import FluxKontextPipeline

    flux = tiny_flux_pipeline(seed=seed, guidance_embeds=True)
    return FluxKontextPipeline(**{k: getattr(flux, k) for k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})


def write_source_images(directory: str | Path, n: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0) -> list[str]:
    """n random RGB PNGs of size (height, width) under `directory`; returns their file names."""
    import numpy as np
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(directory / f"src{i}.png")
        names.append(f"src{i}.png")
    return names


# QwenImageEditPlusPipeline's template words (its `prompt_template_encode`, whose first 64 tokens
# the pipeline drops with the real tokenizer) and the vision special tokens of Qwen2.5-VL.
QWEN_EDIT_TEMPLATE_WORDS = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\nPicture 1: 2: 3: make it a red blue cat dog<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# The tiny Qwen2-VL image processor: 2 px patches, 2×2 merge, temporal patch 2 (the real one: 14, 2, 2)
QWEN_EDIT_PROCESSOR = {"patch_size": 2, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 16,
                       "max_pixels": 64 * 64}


def qwen_edit_tokenizer():
    """A byte-level BPE tokenizer (Qwen2TokenizerFast) trained offline on the edit template, with
    the chat and vision special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([QWEN_EDIT_TEMPLATE_WORDS], trainer)
    return Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def qwen_vl_processor(tokenizer, **overrides):
    """transformers' Qwen2VLProcessor (its own __call__: the image-pad expansion) over the PIL
    Qwen2VLImageProcessor, built without its video processor (which needs torchvision). Tests only:
    the reference the policy's tensor preparation is compared with."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class _Processor(Qwen2VLProcessor):
        def __init__(self, image_processor, tokenizer):  # ProcessorMixin's checks want a video processor
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = None
            self.image_processor, self.tokenizer, self.video_processor, self.chat_template = (
                image_processor, tokenizer, None, None)

    return _Processor(Qwen2VLImageProcessorPil(**{**QWEN_EDIT_PROCESSOR, **overrides}), tokenizer)


def tiny_qwen_image_edit_pipeline(seed: int = 0, zero_cond_t: bool = False):
    """QwenImageEditPlusPipeline (Qwen-Image-Edit-2509; zero_cond_t=True: the 2511 layout, reference
    tokens at t = 0): the tiny Qwen-Image transformer/VAE/scheduler, a tiny Qwen2.5-VL whose vision
    tower takes the tiny processor's 2 px patches, and `processor=None` (the real Qwen2VLProcessor needs
    torchvision; `save_tiny_qwen_edit` writes its preprocessor config)."""
    from diffusers import (
        AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = qwen_edit_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
            patch_size=QWEN_EDIT_PROCESSOR["patch_size"], temporal_patch_size=QWEN_EDIT_PROCESSOR["temporal_patch_size"],
            spatial_merge_size=QWEN_EDIT_PROCESSOR["merge_size"], window_size=8, fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=len(tok) + 5,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    )
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.0],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                     processor=None, transformer=transformer)


def save_tiny_qwen_edit(pipe, directory: str | Path) -> str:
    """`save_tiny`, plus `processor/` as the real folders have it: the Qwen2-VL image processor's
    preprocessor_config.json (and the tokenizer), model_index.json naming Qwen2VLProcessor."""
    import json

    directory = Path(save_tiny(pipe, directory))
    c = QWEN_EDIT_PROCESSOR
    (directory / "processor").mkdir(exist_ok=True)
    pipe.tokenizer.save_pretrained(directory / "processor")
    (directory / "processor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255, "resample": 3, "patch_size": c["patch_size"], "merge_size": c["merge_size"],
        "temporal_patch_size": c["temporal_patch_size"], "min_pixels": c["min_pixels"], "max_pixels": c["max_pixels"],
    }, indent=2))
    index = json.loads((directory / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return str(directory)
