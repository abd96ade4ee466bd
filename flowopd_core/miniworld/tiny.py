"""A tiny SD3-architecture pipeline built fully offline (docs/miniworld.md).

Every component is the real diffusers / transformers class that SD3.5-Medium uses, only smaller and randomly
initialised: ``SD3Transformer2DModel``, two ``CLIPTextModelWithProjection``, a ``T5EncoderModel``, a
``FlowMatchEulerDiscreteScheduler`` and, optionally, an ``AutoencoderKL``. Tokenizers are built from in-memory
vocabularies, so nothing is downloaded:

- CLIP: byte-level BPE (256 byte characters, the same with ``</w>``, start and end tokens) whose merges build
  every plain word of the mini-world's prompts as one piece (``red</w>``), as a real CLIP vocabulary does for
  common words; anything else (the quoted letters of the text task) falls back to characters. CLIP's
  normaliser lower-cases the text.
- T5: a Unigram model over printable ASCII characters (with and without the word-start marker ``▁``);
  it keeps case, so the T5 stream is the only one that tells ``CAT`` from ``cat``.

Pixel space (the default, ``vae_latent_channels=0``): ``vae=None`` and the "latents" are images mapped to
[-1, 1]. A pipeline saved with ``save_pretrained`` is a standard diffusers folder that plain diffusers loads
without flowopd: ``StableDiffusion3Pipeline.from_pretrained(folder, vae=None)`` (diffusers refuses a ``null``
vae entry unless ``vae=None`` is passed). It then assumes a x8 VAE (``vae_scale_factor = 8``): call it with
no ``height``/``width`` and ``output_type="latent"`` (the default size then maps to ``sample_size``
latents), or load it with :func:`flowopd_core.models.pipeline.load_pipeline`, which does both fix-ups.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flowopd_core.miniworld.tiny_config import TinyConfig as TinyConfig
from flowopd_core.models.pipeline import configure_pixel_space

T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
"""Characters of the T5 Unigram vocabulary (each also as a word-start piece ``▁c``)."""


TEST_CONFIG = TinyConfig(
    sample_size=16, patch_size=4, num_layers=2, num_attention_heads=2, attention_head_dim=32, clip_max_length=32
)
"""Unit-test variant: pixel space 16x16x3, 2 layers, inner dim 64 (a forward takes about a millisecond)."""


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank (CLIP's algorithm)."""
    while len(symbols) > 1:
        pairs = [(ranks[pair], pair) for pair in zip(symbols, symbols[1:]) if pair in ranks]
        if not pairs:
            break
        first, second = min(pairs)[1]
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) under which each of ``words`` encodes as one piece ``word</w>``.

    Words are taken in order; while a word still encodes as several pieces under the merges so far, the merge of
    its two leftmost pieces is appended. Appended merges rank after all earlier ones, so they never change how an
    earlier word encodes (BPE only applies a merge when no lower-ranked one applies). Every merge's result is
    a new vocabulary piece, so all intermediate pieces are in the vocabulary.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"word pieces must be ASCII letters, got {word!r}")
        symbols = list(word.lower()[:-1]) + [word.lower()[-1] + "</w>"]
        while len(pieces := _bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def clip_tokenizer(max_length: int, words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """CLIP byte-level BPE tokenizer: 256 byte characters and the same with ``</w>`` (ids 0-511), start 512,
    end = pad 513, then the merged pieces of :func:`word_merges` (``words``) from 514 on. Each of ``words`` is
    one token; any other text falls back to (partly merged) characters. ``words=()`` = character level."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    merges = word_merges(words)
    tokens += list(dict.fromkeys(first + second for first, second in merges if first + second not in tokens))
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        model_max_length=max_length,
    )


def t5_tokenizer(max_length: int, words: tuple[str, ...] = ()) -> T5Tokenizer:
    """T5 Unigram tokenizer over :data:`T5_CHARACTERS` (pad 0, end 1, unknown 2), plus ``words`` as whole
    word-start pieces ``▁word``. A word piece scores higher than spelling the word out, so Unigram picks it;
    anything else (e.g. the quoted letters of the text task) is spelled in characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words if len(w) > 1]
    pieces += [("▁" + c, -3.0) for c in T5_CHARACTERS] + [(c, -3.5) for c in T5_CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def miniworld_words() -> tuple[str, ...]:
    """Every plain word of the mini-world's prompts (both splits: they share one vocabulary), sorted."""
    from flowopd_core.miniworld.tasks import all_prompts

    words = {w.strip(",") for split in ("train", "test") for p in all_prompts(split) for w in p.text.split()}
    return tuple(sorted(w for w in words if w.isalpha() and w.islower()))


def clip_encoder(
    tokenizer: CLIPTokenizer, *, hidden: int, mlp: int, heads: int, layers: int, max_length: int,
    activation: str = "quick_gelu",
) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text tower whose projection is as wide as its hidden state (SD3's CLIP-L and
    CLIP-G, and the mini-world's), for ``tokenizer``'s vocabulary and ``max_length`` positions."""
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=mlp,
            projection_dim=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            hidden_act=activation,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _clip_encoder(config: TinyConfig, tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    return clip_encoder(tokenizer, hidden=config.clip_hidden, mlp=2 * config.clip_hidden, heads=config.text_heads,
                        layers=config.text_layers, max_length=config.clip_max_length)


def _t5_encoder(config: TinyConfig, tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=config.text_dim,
            d_kv=config.text_dim // config.text_heads,
            d_ff=2 * config.text_dim,
            num_layers=config.text_layers,
            num_heads=config.text_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _transformer(config: TinyConfig, channels: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_dim,
        caption_projection_dim=config.inner_dim,
        pooled_projection_dim=2 * config.clip_hidden,
        pos_embed_max_size=config.sample_size // config.patch_size,
    )


def _vae(latent_channels: int) -> AutoencoderKL:
    """A x2-downsampling AutoencoderKL (168 k parameters for 4 latent channels)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,  # SD3's pipeline adds it unconditionally
    )


def build_tiny_pipeline(config: TinyConfig = TinyConfig(), seed: int = 0) -> StableDiffusion3Pipeline:
    """Build a randomly initialised tiny SD3 pipeline, in float32 on the CPU, in eval mode.

    The weights depend only on ``config`` and ``seed`` (the global torch RNG is left untouched). Text encoders
    (and the VAE) are meant to stay frozen; the transformer is what pretraining trains.
    """
    words = miniworld_words()
    tok_clip = clip_tokenizer(config.clip_max_length, words if config.clip_word_pieces else ())
    tok_t5 = t5_tokenizer(config.t5_max_length, words if config.t5_word_pieces else ())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _clip_encoder(config, tok_clip)
        text_encoder_2 = _clip_encoder(config, tok_clip)
        text_encoder_3 = _t5_encoder(config, tok_t5)
        vae = _vae(config.vae_latent_channels) if config.vae_latent_channels else None
        transformer = _transformer(config, config.vae_latent_channels or 3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok_clip,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(config.clip_max_length, words if config.clip_word_pieces else ()),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_t5,
    )
    configure_pixel_space(pipe)
    for module in (text_encoder, text_encoder_2, text_encoder_3, transformer, vae):
        if module is not None:
            module.eval()
    return pipe
