"""Write sampled videos side by side: an animated GIF (one frame per video frame) and a PNG strip.

Videos are ``[n, 3, frames, H, W]`` tensors in [-1, 1]; several named sets of the same size are
laid out as a grid, one row per video, one column per set (e.g. teacher / converted / distilled),
with the set names above the columns.
"""
from __future__ import annotations

from pathlib import Path

import torch

SCALE, GAP, HEADER = 8, 4, 14


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_frame(sets: dict[str, torch.Tensor], frame: int, scale: int = SCALE):
    """One PIL image: frame ``frame`` of every video of every set, rows = videos, columns = sets."""
    from PIL import Image, ImageDraw
    names = list(sets)
    n, _, _, h, w = sets[names[0]].shape
    cell_w, cell_h = w * scale, h * scale
    image = Image.new("RGB", (len(names) * (cell_w + GAP) + GAP, HEADER + n * (cell_h + GAP) + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for c, name in enumerate(names):
        x = GAP + c * (cell_w + GAP)
        draw.text((x, 1), name, fill=(0, 0, 0))
        for r in range(n):
            pixels = to_uint8(sets[name][r, :, frame]).permute(1, 2, 0).contiguous().numpy()
            tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
            image.paste(tile, (x, HEADER + GAP + r * (cell_h + GAP)))
    return image


def write_gif(sets: dict[str, torch.Tensor], path, *, frame_ms: int = 250) -> Path:
    """An animated GIF looping over the frames of every set at once."""
    frames = next(iter(sets.values())).shape[2]
    images = [grid_frame(sets, t) for t in range(frames)]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def write_strip(sets: dict[str, torch.Tensor], path, *, video: int = 0, scale: int = 4) -> Path:
    """A PNG: one row per set, the frames of video ``video`` left to right."""
    from PIL import Image, ImageDraw
    names = list(sets)
    _, _, frames, h, w = sets[names[0]].shape
    label = 70
    image = Image.new("RGB", (label + frames * (w * scale + GAP), len(names) * (h * scale + GAP) + GAP),
                      (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for r, name in enumerate(names):
        y = GAP + r * (h * scale + GAP)
        draw.text((2, y + h * scale // 2 - 5), name, fill=(0, 0, 0))
        for t in range(frames):
            pixels = to_uint8(sets[name][video, :, t]).permute(1, 2, 0).contiguous().numpy()
            image.paste(Image.fromarray(pixels).resize((w * scale, h * scale), Image.NEAREST),
                        (label + t * (w * scale + GAP), y))
    path = Path(path)
    image.save(path)
    return path
