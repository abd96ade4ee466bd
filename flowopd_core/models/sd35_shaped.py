"""A pipeline SHAPED like Stable Diffusion 3.5 Medium, with random weights, built locally (nothing downloaded).

One command writes a standard diffusers folder that ``StableDiffusion3Pipeline.from_pretrained`` and
:func:`flowopd_core.models.pipeline.load_pipeline` load offline::

    python -m flowopd_core.models.sd35_shaped OUT_DIR [--transformer-layers N] [--text-layers N] [--seed S]
                                              [--dtype float32|bfloat16|float16]

Every tensor the transformer sees has SD3.5-Medium's shape; only depth (and the tokenizers' vocabularies) may
be reduced. Where each value comes from:

- transformer ``SD3Transformer2DModel`` (MMDiT-X, 2.2 B parameters at 24 layers): sample_size 128, patch_size 2,
  in/out_channels 16, joint_attention_dim 4096 are the values diffusers' ``scripts/convert_sd3_to_diffusers.py``
  hard-codes for every SD3 checkpoint; num_attention_heads = num_layers = 24 (the script sets heads to the
  depth), attention_head_dim 64 (the class default), so caption_projection_dim = inner dim = 24 x 64 = 1536
  (the script reads it from ``context_embedder.weight``; diffusers' single-file loader recognises an SD3
  checkpoint by the adaLN width 6 x 1536 = 9216); pooled_projection_dim 2048 (= CLIP-L 768 + CLIP-G 1280, the
  class default); pos_embed_max_size 384 (the script: "sd3.5 2b use pos_embed_max_size=384"; the single-file
  loader identifies SD3.5-Medium by its 384^2 = 147456 positions); qk_norm "rms_norm" ("sd3.5 use qk
  norm") and dual_attention_layers 0..12 (the script and ``transformer_sd3.py``: "(0, 1, ..., 12) for sd3.5").
- text encoders, widths of the published encoders (Stability's SD3.5 reference code, ``sd3_infer.py``):
  CLIP-L hidden 768, MLP 3072, 12 heads, quick_gelu, projection 768, 77 positions; CLIP-G (OpenCLIP bigG)
  hidden 1280, MLP 5120, 20 heads, gelu, projection 1280; T5 v1.1-XXL d_model 4096, d_kv 64, 64 heads, d_ff
  10240, gated-gelu. Their depth is ``text_layers`` (the real 12 / 32 / 24 layers change no shape the
  transformer sees). SD3's pipeline takes CLIP's penultimate hidden state, so a CLIP needs >= 1 layer.
- tokenizers: the mini-world's (:func:`flowopd_core.miniworld.tiny.clip_tokenizer`, ``t5_tokenizer``; small
  in-memory vocabularies with the mini-world's words as whole pieces), CLIP max length 77, T5 256 (SD3's
  pipeline default). The pipeline pads T5 to ``max_sequence_length`` (flowopd's text-length setting, at most
  the tokenizer's 256), so the transformer sees 77 + that many text tokens next to (H / 16)^2 image tokens.
- VAE ``AutoencoderKL``: the script's SD3 VAE (SDXL's VAE configuration, block_out_channels (128, 256, 512,
  512), 2 layers per block, 4 down / up encoder blocks, sample_size 1024) with latent_channels 16,
  use_quant_conv / use_post_quant_conv False, scaling_factor 1.5305, shift_factor 0.0609 (x8 downsampling).
- scheduler ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` ("publicly released models use 3.0", sd3_infer.py).

Sizes (measured): at 24 layers the transformer has 2.24 B parameters plus a fixed 147456 x 1536 sin-cos
position buffer (0.23 B values, 0.9 GB, always float32; with it, the 2.5 B of the published checkpoint); in
bfloat16 the folder is 6.0 GB and takes ~50 s and 6.4 GB of memory to write on one CPU core (float32: about
twice). The reduced variant (2 layers, 1 text layer, float32) is 2.8 GB, written in ~25 s (5.2 GB peak).
Building allocates each module once, directly in the target dtype.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from flowopd_core.miniworld.tiny import clip_encoder, clip_tokenizer, miniworld_words, t5_tokenizer

SD35_MEDIUM_LAYERS = 24
"""Joint transformer blocks of SD3.5-Medium."""
SD35_MEDIUM_DUAL_LAYERS = tuple(range(13))
"""Blocks with a second (image-only) attention in SD3.5-Medium (MMDiT-X)."""
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SD35ShapedConfig:
    """Depth, seed and storage dtype of an SD3.5-Medium-shaped pipeline; every width is SD3.5-Medium's."""

    transformer_layers: int = field(
        default=SD35_MEDIUM_LAYERS,
        metadata={"help": "joint transformer blocks (SD3.5-Medium: 24; the CPU test variant: 2)"},
    )
    text_layers: int = field(
        default=1, metadata={"help": "layers of each text encoder (CLIP-L, CLIP-G, T5); depth changes no shape"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random weights (the global RNG is left untouched)"})
    dtype: str = field(
        default="float32", metadata={"help": "storage dtype of the weights: float32, bfloat16 or float16"}
    )

    def __post_init__(self) -> None:
        if self.transformer_layers < 1 or self.text_layers < 1:
            raise ValueError(
                f"transformer_layers and text_layers must be >= 1, got {self.transformer_layers}, {self.text_layers}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def dual_attention_layers(self) -> tuple[int, ...]:
        """SD3.5-Medium's dual-attention blocks that exist at this depth, never the last block (SD3.5-Medium's
        last block, 23, has one attention), at least block 0: (0,) for 1 or 2 layers, 0..12 for 24."""
        return tuple(i for i in SD35_MEDIUM_DUAL_LAYERS if i < self.transformer_layers - 1) or (0,)


def sd35_transformer(config: SD35ShapedConfig) -> SD3Transformer2DModel:
    """SD3.5-Medium's MMDiT-X at ``config.transformer_layers`` blocks (inner dim 1536 = 24 heads x 64)."""
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=config.transformer_layers,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=config.dual_attention_layers,
        qk_norm="rms_norm",
    )


def t5_encoder(tokenizer: T5Tokenizer, layers: int) -> T5EncoderModel:
    """T5 v1.1-XXL's encoder widths (d_model 4096, 64 heads x 64, gated-gelu d_ff 10240) at ``layers``."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=layers,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def sd35_vae() -> AutoencoderKL:
    """SD3 / SD3.5's VAE configuration: x8, 16 latent channels, no quant convs, SD3's latent normalisation."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_sd35_shaped(config: SD35ShapedConfig = SD35ShapedConfig()) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3.5-Medium-shaped pipeline on the CPU, in eval mode, weights in ``config.dtype``.

    The weights depend only on ``config`` (the global torch RNG and default dtype are restored). Modules are
    created directly in the target dtype, so the peak memory is about the pipeline's own size.
    """
    words = miniworld_words()
    tokenizer, tokenizer_2 = clip_tokenizer(CLIP_MAX_LENGTH, words), clip_tokenizer(CLIP_MAX_LENGTH, words)
    tokenizer_3 = t5_tokenizer(T5_MAX_LENGTH, words)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        torch.set_default_dtype(DTYPES[config.dtype])
        try:
            text_encoder = clip_encoder(
                tokenizer, hidden=768, mlp=3072, heads=12, activation="quick_gelu", layers=config.text_layers,
                max_length=CLIP_MAX_LENGTH,
            )
            text_encoder_2 = clip_encoder(
                tokenizer_2, hidden=1280, mlp=5120, heads=20, activation="gelu", layers=config.text_layers,
                max_length=CLIP_MAX_LENGTH,
            )
            text_encoder_3 = t5_encoder(tokenizer_3, config.text_layers)
            vae = sd35_vae()
            transformer = sd35_transformer(config)
        finally:
            torch.set_default_dtype(default_dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        module.eval()
    return pipe


def write_sd35_shaped(folder: str | Path, config: SD35ShapedConfig = SD35ShapedConfig()) -> Path:
    """Build :func:`build_sd35_shaped` and save it as a diffusers folder (safetensors, shards of at most 2 GB,
    so saving adds at most one shard's copy to the peak memory). Returns the folder."""
    folder = Path(folder).expanduser()
    pipe = build_sd35_shaped(config)
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
    return folder


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m flowopd_core.models.sd35_shaped",
        description="Write a diffusers folder shaped like Stable Diffusion 3.5 Medium, with random weights.",
    )
    parser.add_argument("out_dir", help="folder to write (model_index.json and one subfolder per component)")
    for name in ("transformer_layers", "text_layers", "seed", "dtype"):
        spec = SD35ShapedConfig.__dataclass_fields__[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=str if name == "dtype" else int,
            default=spec.default,
            choices=sorted(DTYPES) if name == "dtype" else None,
            help=f"{spec.metadata['help']} (default {spec.default})",
        )
    args = parser.parse_args(argv)
    config = SD35ShapedConfig(args.transformer_layers, args.text_layers, args.seed, args.dtype)
    start = time.perf_counter()
    folder = write_sd35_shaped(args.out_dir, config)
    print(
        f"wrote {folder} ({folder_bytes(folder) / 1e9:.2f} GB, {config.transformer_layers} transformer layers, "
        f"{config.text_layers} text layers, {config.dtype}) in {time.perf_counter() - start:.0f} s"
    )
    return folder


if __name__ == "__main__":
    main()
