"""A procedural video dataset: coloured shapes moving at constant velocity, bouncing off the walls and
occluding one another, deterministic from a seed.

Every video is ``[3, frames, size, size]`` RGB in pixel space, values in [-1, 1]. A video holds
``shapes`` objects (discs and squares), each with its own colour, radius, start position and velocity;
a shape moves in a straight line and reflects off the frame's edges (a triangle wave per axis), and
later shapes are drawn over earlier ones (occlusion). The background is a dark flat colour per video.
Predicting a frame needs the positions and velocities seen in earlier frames, so a model's attention
has to follow objects across frames.

Only torch is imported (no package-relative imports): the teacher's training script loads this file
by path on a machine without the compiler stack.
"""
from __future__ import annotations

import torch

FRAMES, SIZE, SHAPES = 8, 16, 3
MIN_RADIUS, MAX_RADIUS = 1.8, 3.5
MIN_SPEED, MAX_SPEED = 0.6, 1.6   # pixels per frame along each axis


def sample_shape_params(n: int, seed: int, *, size: int = SIZE, shapes: int = SHAPES) -> dict[str, torch.Tensor]:
    """The random draw behind ``n`` videos (CPU generator, so the same seed gives the same videos on
    any device): per video and shape a radius, start centre, velocity (pixels/frame), square-or-disc
    flag and RGB colour; per video a background colour. Shapes ``[n, shapes, ...]``."""
    g = torch.Generator().manual_seed(seed)
    radius = MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * torch.rand(n, shapes, generator=g)
    centre = radius[..., None] + (size - 2 * radius[..., None]) * torch.rand(n, shapes, 2, generator=g)
    speed = MIN_SPEED + (MAX_SPEED - MIN_SPEED) * torch.rand(n, shapes, 2, generator=g)
    sign = torch.where(torch.rand(n, shapes, 2, generator=g) < 0.5, -1.0, 1.0)
    square = torch.rand(n, shapes, generator=g) < 0.5
    colour = torch.rand(n, shapes, 3, generator=g) * 1.6 - 0.6          # bright-ish, never the background
    background = torch.rand(n, 3, generator=g) * 0.3 - 1.0             # dark
    return dict(radius=radius, centre=centre, velocity=speed * sign, square=square, colour=colour,
                background=background)


def bounce(position: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Where a point moving freely to ``position`` ends up between walls at ``low`` and ``high`` that
    reflect it (a triangle wave of period ``2 (high - low)``)."""
    span = (high - low).clamp_min(1e-6)
    phase = torch.remainder(position - low, 2 * span)
    return low + span - (phase - span).abs()


def shape_centres(params: dict[str, torch.Tensor], frames: int, size: int = SIZE) -> torch.Tensor:
    """Centre of every shape at every frame, ``[n, shapes, frames, 2]`` (x, y in pixels)."""
    t = torch.arange(frames, dtype=torch.float32, device=params["centre"].device)
    free = params["centre"][:, :, None, :] + params["velocity"][:, :, None, :] * t[:, None]
    r = params["radius"][:, :, None, None]
    return bounce(free, r, size - r)


def render(params: dict[str, torch.Tensor], frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """Draw the videos, ``[n, 3, frames, size, size]`` in [-1, 1]: shapes in order, each over the ones
    before it, with a one-pixel soft edge (coverage of the pixel centre)."""
    centres = shape_centres(params, frames, size)                        # [n, S, F, 2]
    pix = torch.arange(size, dtype=torch.float32, device=centres.device) + 0.5
    dx = pix[None, None, None, None, :] - centres[..., 0, None, None]    # [n, S, F, 1, W]
    dy = pix[None, None, None, :, None] - centres[..., 1, None, None]    # [n, S, F, H, 1]
    disc = torch.sqrt(dx ** 2 + dy ** 2)
    box = torch.maximum(dx.abs(), dy.abs())
    square = params["square"][:, :, None, None, None]
    distance = torch.where(square, box, disc)                            # [n, S, F, H, W]
    coverage = (params["radius"][:, :, None, None, None] - distance + 0.5).clamp(0, 1)
    n = centres.shape[0]
    video = params["background"][:, :, None, None, None].expand(n, 3, frames, size, size).clone()
    for s in range(centres.shape[1]):
        alpha = coverage[:, s][:, None]                                  # [n, 1, F, H, W]
        video = video * (1 - alpha) + params["colour"][:, s, :, None, None, None] * alpha
    return video


def bouncing_shapes(n: int, seed: int, *, frames: int = FRAMES, size: int = SIZE, shapes: int = SHAPES,
                    device=None) -> torch.Tensor:
    """``n`` videos ``[n, 3, frames, size, size]`` in [-1, 1], the same for the same seed."""
    params = sample_shape_params(n, seed, size=size, shapes=shapes)
    if device is not None:
        params = {k: v.to(device) for k, v in params.items()}
    return render(params, frames, size)
