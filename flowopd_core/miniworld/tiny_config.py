"""The sizes of a tiny SD3 pipeline (:class:`TinyConfig`), importable without torch: the pretraining node
declares its ports from it. :mod:`flowopd_core.miniworld.tiny` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny SD3 pipeline. Defaults: pixel space 32x32x3, patch 4, 4 layers, 4 heads x 32.

    Text: both tokenizers hold the mini-world's words as whole pieces, so CLIP's 16 tokens hold every prompt
    (the longest takes 12 with start and end; tests check that no prompt of any task or split is truncated).
    The transformer sees ``clip_max_length + t5_max_length`` text tokens next to ``(sample / patch)^2`` image
    tokens (32 + 64 by default; a forward at 32 text tokens is 1.7x faster than at 80).
    """

    sample_size: int = field(default=32, metadata={"help": "latent height = width (pixels in pixel space)"})
    patch_size: int = field(default=4, metadata={"help": "transformer patch size; tokens = (sample/patch)^2"})
    num_layers: int = field(default=4, metadata={"help": "joint transformer blocks"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    attention_head_dim: int = field(default=32, metadata={"help": "width per head; inner dim = heads x this"})
    text_dim: int = field(
        default=64, metadata={"help": "T5 d_model = transformer joint_attention_dim; must be >= 2 x clip_hidden"}
    )
    clip_hidden: int = field(default=32, metadata={"help": "hidden (and projection) width of each CLIP encoder"})
    text_layers: int = field(default=2, metadata={"help": "layers of each text encoder"})
    text_heads: int = field(default=2, metadata={"help": "attention heads of each text encoder"})
    clip_max_length: int = field(
        default=16, metadata={"help": "CLIP tokens incl. start and end (a mini-world word is one token, other "
                                      "text one per character); longer prompts are truncated"}
    )
    t5_max_length: int = field(default=16, metadata={"help": "T5 tokens used by flowopd (pass as max_sequence_length)"})
    t5_word_pieces: bool = field(
        default=True,
        metadata={
            "help": "give the T5 tokenizer the mini-world's prompt words as whole pieces (as a real T5 vocabulary "
            "has word pieces), so 16 tokens hold a whole prompt; False = characters only"
        },
    )
    clip_word_pieces: bool = field(
        default=True,
        metadata={
            "help": "give the CLIP tokenizers BPE merges that build each mini-world prompt word as one piece, so "
            "16 tokens hold a whole prompt; False = characters only (then clip_max_length needs about 64)"
        },
    )
    vae_latent_channels: int = field(
        default=0, metadata={"help": "0 = pixel space (vae=None, 3 channels); else a tiny x2 AutoencoderKL"}
    )
    shift: float = field(default=1.0, metadata={"help": "FlowMatchEulerDiscreteScheduler shift"})

    def __post_init__(self) -> None:
        for name in ("sample_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim",
                     "text_dim", "clip_hidden", "text_layers", "text_heads", "clip_max_length", "t5_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        if self.text_dim < 2 * self.clip_hidden:
            raise ValueError(f"text_dim {self.text_dim} must be >= 2 x clip_hidden {self.clip_hidden} (SD3 pads CLIP)")
        if self.clip_max_length < 3:
            raise ValueError("clip_max_length must leave room for start and end tokens (>= 3)")
        if self.vae_latent_channels < 0 or self.shift <= 0:
            raise ValueError("vae_latent_channels must be >= 0 and shift > 0")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def image_size(self) -> int:
        """Pixel height = width of the images the pipeline produces."""
        return self.sample_size * (2 if self.vae_latent_channels else 1)
