"""Image helpers: layout conversions and PNG grids a person can look at.

Core convention: images are float tensors ``(B, 3, H, W)`` in [0, 1]. ComfyUI's ``IMAGE`` is ``(B, H, W, 3)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_comfy(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ComfyUI ``(B, H, W, 3)``, float32 in [0, 1]."""
    _check(images, channels_first=True)
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def from_comfy(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``(B, H, W, 3)`` -> ``(B, 3, H, W)``, float32 in [0, 1]."""
    _check(images, channels_first=False)
    return images.detach().float().permute(0, 3, 1, 2).contiguous()


def _check(images: torch.Tensor, *, channels_first: bool) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"expected a 4-d image tensor, got {getattr(images, 'shape', type(images))}")
    channels = images.shape[1] if channels_first else images.shape[-1]
    if channels != 3:
        layout = "(B, 3, H, W)" if channels_first else "(B, H, W, 3)"
        raise ValueError(f"expected images {layout}, got shape {tuple(images.shape)}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W, 3)`` uint8 (NaN -> 0)."""
    _check(images, channels_first=True)
    arr = torch.nan_to_num(images.detach().float(), nan=0.0).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return np.round(arr * 255.0).astype(np.uint8)


def from_uint8(arrays: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 (or a list of ``(H, W, 3)``) -> ``(B, 3, H, W)`` float32 in [0, 1] (inverse of
    :func:`to_uint8`)."""
    stacked = np.stack(arrays) if isinstance(arrays, list) else arrays
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def grid_image(
    images: torch.Tensor,
    *,
    ncols: int = 0,
    scale: int = 4,
    pad: int = 2,
    captions: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """Lay ``(B, 3, H, W)`` images out on a grid, upscaled ``scale`` times (nearest), with optional captions.

    ``ncols = 0`` picks a near-square layout. Captions are wrapped under each cell.
    """
    tiles = to_uint8(images)
    count, height, width = tiles.shape[0], tiles.shape[1] * scale, tiles.shape[2] * scale
    if count == 0:
        raise ValueError("no images to lay out")
    ncols = ncols or max(1, math.ceil(math.sqrt(count)))
    nrows = math.ceil(count / ncols)
    font = ImageFont.load_default(size=max(10, min(14, width // 10)))
    line_h = 12 if captions else 0
    chars = max(8, width // 7)
    wrapped = [_wrap(c, chars)[:3] for c in captions] if captions else [[] for _ in range(count)]
    caption_h = line_h * max((len(w) for w in wrapped), default=0)
    title_h = 18 if title else 0
    cell_w, cell_h = width + pad, height + caption_h + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=ImageFont.load_default(size=13))
    for i in range(count):
        row, col = divmod(i, ncols)
        x, y = pad + col * cell_w, title_h + pad + row * cell_h
        tile = Image.fromarray(tiles[i]).resize((width, height), Image.NEAREST)
        canvas.paste(tile, (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + height + j * line_h), line, fill=(40, 40, 40), font=font)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if len(candidate) > width and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def save_grid(images: torch.Tensor, path: str | Path, **kwargs) -> Path:
    """Write :func:`grid_image` to ``path`` (PNG) and return the path."""
    path = Path(path)
    grid_image(images, **kwargs).save(path, format="PNG")
    return path


def load_png(path: str | Path) -> torch.Tensor:
    """A PNG file as ``(1, 3, H, W)`` float32 in [0, 1] (e.g. a chart to show on the canvas)."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
