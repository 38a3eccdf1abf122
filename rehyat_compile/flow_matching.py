"""Rectified flow matching, the objective Wan2.1 is trained with, for the tiny trained teacher.

Convention (Wan's): flow time ``s`` in [0, 1], ``x_s = (1 - s) x0 + s noise``; the model predicts the
velocity ``noise - x0`` and is called with ``timestep = 1000 s``. Sampling integrates ``dx/ds = v``
from pure noise at s = 1 to s = 0 with Euler steps.

``model_fn(x_s, s) -> velocity`` is any callable; :func:`wan_velocity` makes one from a diffusers-style
video transformer (``model(x, timestep=..., encoder_hidden_states=..., return_dict=False)[0]``).
Only torch is imported (see ``bouncing_shapes``: the training script loads this file by path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TIMESTEP_SCALE = 1000.0


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noisy(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s noise``, ``s`` one value per sample ``[B]``."""
    s = _per_sample(s, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict at every s: ``noise - x0``."""
    return noise - x0


def null_text(batch: int, text_dim: int, *, tokens: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """The unconditional model's text input: zeros ``[batch, tokens, text_dim]``."""
    return torch.zeros(batch, tokens, text_dim, device=device, dtype=dtype)


def wan_inputs(x_s: torch.Tensor, s: torch.Tensor, text: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) of a diffusers Wan call at flow time ``s`` ``[B]``."""
    return (x_s,), dict(timestep=s * TIMESTEP_SCALE, encoder_hidden_states=text, return_dict=False)


def wan_velocity(model, text_dim: int):
    """``model_fn(x_s, s)`` for a diffusers-style video transformer (or its converted hybrid), called
    with the null text."""
    def model_fn(x_s, s):
        args, kwargs = wan_inputs(x_s, s, null_text(x_s.shape[0], text_dim, device=x_s.device, dtype=x_s.dtype))
        return model(*args, **kwargs)[0]
    return model_fn


def flow_matching_loss(model_fn, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity at ``x_s`` (fp32)."""
    pred = model_fn(noisy(x0, noise, s), s)
    return F.mse_loss(pred.float(), velocity_target(x0, noise).float())


def stratified_times(n: int, seed: int) -> torch.Tensor:
    """``n`` flow times, one uniform draw inside each of n equal bins of (0, 1): a low-variance
    estimate of the loss averaged over s."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) + torch.rand(n, generator=g)) / n


def validation_batches(videos: torch.Tensor, seed: int, batch: int):
    """Fixed (x0, noise, s) triples over ``videos`` ``[n, ...]``: the same noise and times on every
    call with the same seed, so two models' validation losses differ only by the models."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(videos.shape, generator=g)
    times = stratified_times(videos.shape[0], seed + 1)
    return [(videos[i:i + batch], noise[i:i + batch], times[i:i + batch]) for i in range(0, videos.shape[0], batch)]


@torch.no_grad()
def validation_loss(model_fn, batches, device=None) -> float:
    """Mean flow-matching loss over :func:`validation_batches` (weighted by batch size)."""
    total = count = 0.0
    for x0, noise, s in batches:
        x0, noise, s = (t.to(device) for t in (x0, noise, s)) if device is not None else (x0, noise, s)
        total += float(flow_matching_loss(model_fn, x0, noise, s)) * x0.shape[0]
        count += x0.shape[0]
    return total / count


def sample_times(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` flow times of the sampler, 1 -> 0, optionally shifted towards s = 1 as Wan
    does (``shift s / (1 + (shift - 1) s)``)."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def euler_sample(model_fn, noise: torch.Tensor, steps: int = 20, shift: float = 1.0) -> torch.Tensor:
    """Integrate from ``noise`` (s = 1) to a clean sample (s = 0) with ``steps`` Euler steps."""
    x = noise
    times = sample_times(steps, shift).tolist()
    for s, s_next in zip(times[:-1], times[1:]):
        s_batch = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        x = x + (s_next - s) * model_fn(x, s_batch)
    return x
