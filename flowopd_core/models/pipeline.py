"""The model layer: load a local SD3-family pipeline, cache text embeddings, batched-CFG velocity, decode.

Notation (docs/method.md): time ``t`` is the scheduler sigma in [0, 1], t = 1 is noise;
x_t = (1 - t) x0 + t eps; the transformer predicts the velocity v ~ eps - x0 and takes ``timestep = 1000 t``
(the scheduler's ``num_train_timesteps``). Latents are ``(B, C, H, W)``; images ``(B, 3, H, W)`` in [0, 1].
Pixel-space pipelines (``vae=None``) use images mapped to [-1, 1] as latents.

The same calls serve the tiny mini-world pipeline and SD3.5-Medium: only the folder differs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from flowopd_core.choices import MAX_T5_LENGTH, PRECISIONS
from flowopd_core.models.files import SD3_SINGLE_FILE_MARKER, is_sd3_single_file, safetensors_keys

NUM_TRAIN_TIMESTEPS = 1000
"""SD3 timestep = sigma * 1000 (``FlowMatchEulerDiscreteScheduler.num_train_timesteps``)."""
DEFAULT_T5_LENGTH = 128
"""T5 tokens when neither the model reference nor the tokenizer asks for fewer: Flow-GRPO's and the Flow-OPD
authors' 128 (the SD3 pipeline's own default is 256: twice the text tokens in every transformer forward)."""
# MAX_T5_LENGTH, PRECISIONS: see flowopd_core.choices (re-exported here). PRECISIONS: ``auto`` = fp32 on the CPU,
# bf16 on CUDA; bf16 / fp16 run the transformer under ``torch.autocast`` (weights keep their dtype; outputs are
# returned in float32).


# --------------------------------------------------------------------------------------------- loading


def configure_pixel_space(pipe: StableDiffusion3Pipeline) -> StableDiffusion3Pipeline:
    """Make a ``vae=None`` pipeline treat latents as pixels: ``vae_scale_factor = 1`` (diffusers assumes 8).

    A pipeline with a VAE is returned unchanged. Mutates and returns ``pipe``.
    """
    if pipe.vae is None:
        pipe.vae_scale_factor = 1
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=1)
    return pipe


def load_pipeline(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_sequence_length: int = 0,
    config: str | Path = "",
) -> StableDiffusion3Pipeline:
    """Load a ``StableDiffusion3Pipeline`` from a local diffusers folder (never from a hub).

    Works for SD3 / SD3.5 folders and for the tiny mini-world pipeline (pixel space: see
    :func:`configure_pixel_space`). All modules are put in eval mode. ``max_sequence_length``: T5 tokens of
    every prompt encoding (:func:`set_text_length`; 0 = the default). Raises ``FileNotFoundError`` naming
    ``path`` when it is not a pipeline folder.

    ``path`` may also be a single-file SD3 / SD3.5 checkpoint (``.safetensors`` in the original layout); then
    ``config`` names a local diffusers folder of the same architecture, whose configs (and whatever the file
    lacks: text encoders, tokenizers, scheduler, VAE) are used (:func:`load_single_file_pipeline`).
    """
    if Path(path).expanduser().is_file():
        pipe = load_single_file_pipeline(path, config, dtype=dtype)
    else:
        folder = require_pipeline_folder(path)
        pipe = StableDiffusion3Pipeline.from_pretrained(
            # safetensors only, no .bin fallback
            folder, dtype=dtype, local_files_only=True, use_safetensors=True, **_pixel_space(folder)
        )
    if pipe.transformer.dtype != dtype:  # older diffusers releases know only the `torch_dtype` keyword
        raise RuntimeError(f"diffusers loaded {pipe.transformer.dtype}, not {dtype}: this release ignores `dtype`")
    configure_pixel_space(pipe).to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    set_text_length(pipe, max_sequence_length)
    return pipe


PIPELINE_LIBRARIES = ("diffusers", "transformers")
"""The only libraries a pipeline folder's model_index.json may name for its components: diffusers imports the
module each entry names, so any other (a module of the file's choosing) is refused before it loads."""


def require_pipeline_folder(path: str | Path) -> Path:
    """``path`` as a folder holding ``model_index.json`` whose components come from :data:`PIPELINE_LIBRARIES`;
    ``FileNotFoundError`` naming it when it is missing, ``ValueError`` naming an entry from another library."""
    folder = Path(path).expanduser()
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline folder at {str(folder)!r} (expected {str(index_file)!r}); "
            "flowopd loads models from local folders only"
        )
    index = json.loads(index_file.read_text())
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        if entry[0] not in PIPELINE_LIBRARIES:
            raise ValueError(f"{str(index_file)!r}: component {name} names the library {entry[0]!r}; a pipeline "
                             f"folder's components come from {list(PIPELINE_LIBRARIES)} only")
    return folder


def _pixel_space(folder: Path) -> dict:
    """diffusers refuses a ``null`` vae entry unless ``vae=None`` is passed (pixel-space folders)."""
    index = json.loads((folder / "model_index.json").read_text())
    return {"vae": None} if index.get("vae", [None])[0] is None else {}


def load_single_file_pipeline(path: str | Path, config: str | Path, *,
                              dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """An SD3 / SD3.5 single-file checkpoint loaded with diffusers' ``from_single_file`` against the local
    diffusers folder ``config`` (same architecture): nothing is downloaded.

    The transformer (and the VAE and text encoders, when the file holds them: ``first_stage_model.*``,
    ``text_encoders.clip_l / clip_g / t5xxl.*``) come from the file; every component the file lacks (SD3.5
    files without text encoders, tokenizers, the scheduler) comes from ``config``. Raises
    ``FileNotFoundError`` naming a missing file or config folder, ``ValueError`` for a file that is not an
    SD3-family checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    if not is_sd3_single_file(path):
        raise ValueError(f"{str(path)!r} is not an SD3 / SD3.5 single-file checkpoint (.safetensors with "
                         f"{SD3_SINGLE_FILE_MARKER!r})")
    if not str(config):
        raise FileNotFoundError(f"{str(path)!r} is a single file: name a local diffusers folder of the same "
                                "architecture as its config")
    folder = require_pipeline_folder(config)
    keys = safetensors_keys(path)
    held = {name for name, prefix in SINGLE_FILE_COMPONENTS.items() if any(k.startswith(prefix) for k in keys)}
    index = json.loads((folder / "model_index.json").read_text())
    # Components the file lacks are loaded here from the config folder and passed in: diffusers' own fallback
    # looks for diffusers weight names only (diffusion_pytorch_model.*), not transformers' model.safetensors.
    given: dict = dict(_pixel_space(folder))
    for name in SINGLE_FILE_COMPONENTS:
        library, class_name = (index.get(name) or [None, None])[:2]
        if name in held or name in given or class_name is None:
            continue
        cls = single_file_component_class(name, library, class_name, folder)
        given[name] = cls.from_pretrained(folder / name, dtype=dtype, local_files_only=True, use_safetensors=True)
    pipe = StableDiffusion3Pipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, dtype=dtype, **given
    )
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        if _meta_tensors(module) and hasattr(module, "tie_weights"):
            module.tie_weights()  # T5 in SD3 files: encoder.embed_tokens is tied to `shared`, stored once
        missing = _meta_tensors(module)
        if missing:
            raise ValueError(f"{str(path)!r}: the file's {name} lacks {missing[:3]}")
    return pipe


SINGLE_FILE_COMPONENTS = {
    "text_encoder": "text_encoders.clip_l.",
    "text_encoder_2": "text_encoders.clip_g.",
    "text_encoder_3": "text_encoders.t5xxl.",
    "vae": "first_stage_model.",
}
"""Where an SD3 single file holds each optional component (key prefix); a file without one takes it from the
config folder (SD3.5's files hold no text encoders)."""


def single_file_component_class(name: str, library: str | None, class_name: str, folder: Path) -> type:
    """The class of SD3 component ``name`` that ``folder``'s model_index.json names, from the literal list of
    what an SD3 pipeline holds there; a module or class named in the file is never imported. ``ValueError``
    naming the component and the class otherwise."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    known = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
             "text_encoder_3": T5EncoderModel, "vae": AutoencoderKL}
    cls = known[name]
    library_of = cls.__module__.split(".")[0]
    if (library, class_name) != (library_of, cls.__name__):
        raise ValueError(f"{str(folder / 'model_index.json')!r}: {name} is [{library!r}, {class_name!r}]; an SD3 "
                         f"pipeline holds [{library_of!r}, {cls.__name__!r}] there")
    return cls


def _meta_tensors(module: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers left without data (on the meta device) after loading."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.is_meta]


TEXT_LENGTH_ATTR = "flowopd_max_sequence_length"
"""The pipeline attribute holding the T5 length chosen by :func:`set_text_length`."""


def set_text_length(pipe: StableDiffusion3Pipeline, max_sequence_length: int = 0) -> int:
    """Fix the T5 tokens every :class:`TextEmbeddingCache` of ``pipe`` encodes (the text length the transformer
    sees is CLIP's 77 (or the tokenizer's) + this). 0 = the default: the tokenizer's ``model_max_length`` when
    shorter, else :data:`DEFAULT_T5_LENGTH` (128). Returns the length set."""
    if not 0 <= max_sequence_length <= MAX_T5_LENGTH:
        raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_LENGTH}] (0 = default), "
                         f"got {max_sequence_length}")
    length = max_sequence_length or default_text_length(pipe)
    setattr(pipe, TEXT_LENGTH_ATTR, length)
    return length


def default_text_length(pipe: StableDiffusion3Pipeline) -> int:
    """The T5 length of ``pipe``: the one :func:`set_text_length` chose, else min(the tokenizer's
    ``model_max_length``, :data:`DEFAULT_T5_LENGTH`)."""
    chosen = getattr(pipe, TEXT_LENGTH_ATTR, None)
    if chosen:
        return int(chosen)
    declared = getattr(getattr(pipe, "tokenizer_3", None), "model_max_length", DEFAULT_T5_LENGTH)
    return min(int(declared), DEFAULT_T5_LENGTH)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``fp32`` on the CPU, ``bf16`` on CUDA; other values as given (see :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context of a model call at ``precision`` (resolved): nothing for fp32, ``torch.autocast`` to
    bfloat16 / float16 on ``device``'s type otherwise."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def latent_shape(
    pipe: StableDiffusion3Pipeline, batch_size: int, height: int | None = None, width: int | None = None
) -> tuple[int, int, int, int]:
    """``(B, C, H, W)`` of the latents for images of ``height`` x ``width`` pixels.

    Defaults to the transformer's ``sample_size`` latents. Sizes must be multiples of
    ``vae_scale_factor * patch_size``.
    """
    config = pipe.transformer.config
    scale = pipe.vae_scale_factor
    height = height or config.sample_size * scale
    width = width or config.sample_size * scale
    multiple = scale * config.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height} x {width}")
    return (batch_size, config.in_channels, height // scale, width // scale)


def initial_noise(
    pipe: StableDiffusion3Pipeline,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_T ~ N(0, I) of shape :func:`latent_shape`, on the transformer's device (diffusers' ``randn_tensor``)."""
    shape = latent_shape(pipe, batch_size, height, width)
    return randn_tensor(shape, generator=generator, device=pipe.transformer.device, dtype=dtype)


# --------------------------------------------------------------------------------------------- text


@dataclass
class TextEmbeddings:
    """Conditioning of a batch. prompt_embeds: ``(B, L, D)`` (CLIP tokens then T5 tokens); pooled: ``(B, P)``."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def expand(self, batch_size: int) -> TextEmbeddings:
        """Broadcast a single row to ``batch_size`` rows (no copy)."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} embeddings to a batch of {batch_size}")
        return TextEmbeddings(
            self.prompt_embeds.expand(batch_size, -1, -1), self.pooled.expand(batch_size, -1)
        )

    @staticmethod
    def cat(parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
        return TextEmbeddings(
            torch.cat([p.prompt_embeds for p in parts]), torch.cat([p.pooled for p in parts])
        )


class TextEmbeddingCache:
    """Encode each distinct prompt once per run with ``pipe.encode_prompt``; serve batches from the cache.

    Embeddings are stored in the transformer's dtype on the transformer's device (at construction). Each
    prompt is encoded alone (batch of one, no autograd): CPU kernels round differently for other batch sizes,
    so this makes an embedding independent of which prompts were encoded with it (exact resumes). After
    :meth:`close` the cache drops its pipeline reference and the text encoders may be freed or offloaded by
    the owner; a prompt that was not cached then raises ``KeyError``.
    """

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        *,
        max_sequence_length: int | None = None,
        negative_prompt: str = "",
    ) -> None:
        if max_sequence_length is None:
            max_sequence_length = default_text_length(pipe)
        if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_LENGTH}], got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.dtype = pipe.transformer.dtype
        self.device = pipe.transformer.device
        self._pipe: StableDiffusion3Pipeline | None = pipe
        # keyed by (prompt, T5 length): an embedding is only ever served at the length it was encoded with
        self._rows: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return (prompt, self.max_sequence_length) in self._rows

    @torch.no_grad()
    def _encode_missing(self, prompts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self))
        if not missing:
            return
        if self._pipe is None:
            raise KeyError(f"prompts not in the closed text-embedding cache: {missing[:3]}")
        for prompt in missing:
            embeds, _, pooled, _ = self._pipe.encode_prompt(
                prompt=[prompt],
                prompt_2=None,
                prompt_3=None,
                device=self._pipe.text_encoder.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            self._rows[prompt, self.max_sequence_length] = (embeds[0].to(self.device, self.dtype),
                                                            pooled[0].to(self.device, self.dtype))

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Embeddings of ``prompts`` in order: ``prompt_embeds`` ``(B, L, D)``, ``pooled`` ``(B, P)``."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        self._encode_missing(prompts)
        rows = [self._rows[p, self.max_sequence_length] for p in prompts]
        return TextEmbeddings(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    def negative(self, batch_size: int = 1) -> TextEmbeddings:
        """The negative-prompt embeddings broadcast to ``batch_size`` rows (the CFG unconditional branch)."""
        return self.encode([self.negative_prompt]).expand(batch_size)

    def close(self) -> None:
        """Stop encoding: drop the pipeline reference so that its text encoders can be released."""
        self._pipe = None


# --------------------------------------------------------------------------------------------- model


def velocity(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    t: float | torch.Tensor,
    cond: TextEmbeddings,
    uncond: TextEmbeddings | None = None,
    guidance_scale: float = 1.0,
    adapter_names: Sequence[str] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Velocity v(x, t | c) with classifier-free guidance as ONE batched forward (docs/method.md §1, CFG).

    v = v_u + w (v_c - v_u) with w = ``guidance_scale``; the forward runs on ``cat([uncond, cond])``. With
    w = 1 a single conditional forward runs and ``uncond`` is not needed.

    transformer: an ``SD3Transformer2DModel`` or a peft-wrapped one (e.g. :class:`flowopd_core.models.policy.Policy`).
    x: ``(B, C, H, W)`` latents. t: sigma in [0, 1], a float, 0-dim or ``(B,)``; the model gets 1000 t.
    cond: ``B`` rows (or 1, broadcast). uncond: ``B`` rows or 1 (broadcast), required when w != 1.
    adapter_names: optional per-sample peft adapter names (``"__base__"`` = no adapter), length ``B``;
        peft accepts them only in eval mode. precision: of the forward (:data:`PRECISIONS`; bf16 / fp16 run
        under ``torch.autocast``). Returns ``(B, C, H, W)`` in float32 (the guidance combination is done in
        float32 even for half-precision models and autocast forwards).
    """
    batch = x.shape[0]
    dtype = transformer.dtype
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(batch)
    cond = cond.expand(batch)
    names = list(adapter_names) if adapter_names is not None else None
    if names is not None and len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch}")
    guided = guidance_scale != 1.0
    if guided:
        if uncond is None:
            raise ValueError(f"guidance_scale {guidance_scale} != 1 needs uncond embeddings")
        cond = TextEmbeddings.cat([uncond.expand(batch), cond])
        x = torch.cat([x, x])
        t = torch.cat([t, t])
        names = names + names if names is not None else None
    extra = {"adapter_names": names} if names is not None else {}
    with autocast(x.device, precision):
        out = transformer(
            hidden_states=x.to(dtype),
            timestep=(t * NUM_TRAIN_TIMESTEPS).to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
            **extra,
        )[0].float()
    if not guided:
        return out
    v_uncond, v_cond = out.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


# --------------------------------------------------------------------------------------------- images


def encode_images(
    pipe: StableDiffusion3Pipeline, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] -> latents ``(B, C, H/f, W/f)``.

    Pixel space: x = 2 img - 1. VAE: a sample of the posterior, then ``(z - shift) * scaling`` (SD3's
    normalisation; ``shift_factor`` may be absent).
    """
    x = 2.0 * images - 1.0
    if pipe.vae is None:
        return x
    vae = pipe.vae
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


def decode(pipe: StableDiffusion3Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1], float32 (inverse of :func:`encode_images`).

    Pixel space: (x + 1) / 2 clamped. VAE: z / scaling + shift, decode, then (y + 1) / 2 clamped.
    """
    if pipe.vae is None:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    vae = pipe.vae
    shift = vae.config.shift_factor or 0.0
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    image = vae.decode(z, return_dict=False)[0]
    return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)
