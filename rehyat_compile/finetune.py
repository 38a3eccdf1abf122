"""Stage 2 of the ReHyAt recipe: fine-tune the whole converted model with the model's own objective.

Every parameter of the hybrid trains -- the feature maps phi_q, phi_k of every converted site and the
original model's weights (the hybrid's graphs read them, shared, not copied) -- by AdamW on the
flow-matching loss the video DiTs in :data:`FLOW_MATCHING_MODELS` are trained with, or on a loss the
caller gives for any other objective.

Flow matching (Wan's convention, ``flow_matching.py``): for a batch of clean latents ``x0`` draw a
flow time ``s ~ U(0, 1)`` and Gaussian noise per sample, call the model on
``x_s = (1 - s) x0 + s noise`` with ``timestep = 1000 s`` and regress ``noise - x0``.

Scale-out: launched with ``torchrun --nproc-per-node N`` (NCCL on GPUs, gloo on CPU) each rank takes
every N-th batch of ``data`` and draws its own noise; gradients are averaged over ranks before every
optimizer step (one flattened all-reduce), so the ranks stay identical: data-parallel training.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .distill import _progress, init_distributed
from .flow_matching import TIMESTEP_SCALE, noisy, velocity_target

FLOW_MATCHING_MODELS = frozenset({
    "WanTransformer3DModel", "WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel",
    "ChronoEditTransformer3DModel", "HeliosTransformer3DModel", "HunyuanVideoTransformer3DModel",
    "HunyuanVideoFramepackTransformer3DModel", "HunyuanVideo15Transformer3DModel", "LTXVideoTransformer3DModel",
    "LTX2VideoTransformer3DModel", "MochiTransformer3DModel", "SanaVideoTransformer3DModel",
    "Kandinsky5Transformer3DModel",
})
"""diffusers video transformers whose published checkpoints are trained with rectified flow matching
(their pipelines use ``FlowMatchEulerDiscreteScheduler``) and take ``timestep`` in [0, 1000]. Others
(CogVideoX: v-prediction; Latte, Allegro: DDPM) need ``loss=``."""


@dataclass
class FinetuneReport:
    """What :func:`finetune` did: the loss at every step (this rank's batch, before the step),
    ``objective`` ('flow_matching' or 'custom'), learning rates, wall time and number of ranks."""

    loss_curve: list[float]
    steps: int
    lr: float
    phi_lr: float
    objective: str
    seconds: float
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        first, last = self.loss_curve[:10], self.loss_curve[-10:]
        return (f"finetune ({self.objective}): {self.steps} steps, lr={self.lr:g} (phi {self.phi_lr:g}), "
                f"{self.seconds:.1f} s on {self.world_size} process(es); mean loss of the first 10 steps "
                f"{sum(first) / len(first):.4f} -> last 10 {sum(last) / len(last):.4f}")


def model_class_name(hybrid: nn.Module) -> str:
    """The class name of the model ``hybrid`` was converted from (``hybrid`` itself if not converted)."""
    return type(getattr(hybrid, "original", hybrid)).__name__


def is_flow_matching_model(hybrid: nn.Module) -> bool:
    return model_class_name(hybrid) in FLOW_MATCHING_MODELS


def flow_matching_step_loss(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    """The flow-matching loss of one ``(args, kwargs)`` batch whose ``args[0]`` holds clean latents:
    ``args[0]`` becomes ``x_s`` and ``kwargs['timestep']`` ``1000 s``, one ``s`` per sample."""
    args, kwargs = batch
    x0 = args[0]
    s = torch.rand(x0.shape[0], generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    out = model(noisy(x0, noise, s), *args[1:], **{**kwargs, "timestep": s * TIMESTEP_SCALE})
    pred = out if torch.is_tensor(out) else out[0]
    return torch.nn.functional.mse_loss(pred.float(), velocity_target(x0, noise).float())


def parameter_groups(hybrid: nn.Module, lr: float, phi_lr: float, train_original: bool = True) -> list[dict]:
    """AdamW groups: the feature maps at ``phi_lr`` (they are new and move faster), every other
    parameter of the hybrid (the original model's) at ``lr`` -- none if ``train_original`` is False."""
    maps = getattr(hybrid, "feature_maps", None)
    phi = [] if maps is None else [p for p in maps.parameters() if p.requires_grad]
    phi_ids = {id(p) for p in phi}
    base = [p for p in hybrid.parameters() if p.requires_grad and id(p) not in phi_ids] if train_original else []
    groups = [g for g in ({"params": phi, "lr": phi_lr}, {"params": base, "lr": lr}) if g["params"]]
    if not groups:
        raise ValueError("hybrid has no trainable parameters")
    return groups


def average_gradients(params: list[torch.Tensor]) -> None:
    """Mean of every parameter's gradient over the ranks (missing gradients count as zero), in one
    flattened all-reduce."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def broadcast_parameters(params: list[torch.Tensor], src: int = 0) -> None:
    """Every rank starts from rank ``src``'s weights."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src)


def _batches_forever(data: Iterable, rank: int, world: int):
    """This rank's share of ``data`` (every ``world``-th batch), cycled: a list or a DataLoader is
    iterated again when it ends."""
    while True:
        seen = 0
        for i, batch in enumerate(data):
            if i % world == rank:
                seen += 1
                yield batch
        if seen == 0:
            raise ValueError(f"data gave no batch for rank {rank} of {world}: it must hold at least {world} "
                             "batches (and be iterable more than once if steps exceed its length)")


def _check_batch(batch, i: int):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], (tuple, list))
            and isinstance(batch[1], Mapping) and batch[0] and torch.is_tensor(batch[0][0])):
        raise TypeError(f"data[{i}] must be an (args, kwargs) pair with the clean latents as args[0] "
                        "(or pass loss= to read batches of another form)")
    return tuple(batch[0]), dict(batch[1])


def finetune(hybrid: nn.Module, data: Iterable, *, steps: int = 100, lr: float = 1e-4, loss: Callable | None = None,
             progress: bool = True, phi_lr: float | None = None, train_original: bool = True,
             weight_decay: float = 0.0, clip_grad_norm: float | None = 1.0, seed: int = 0) -> FinetuneReport:
    """Fine-tune ``hybrid`` (the result of ``rc.transform``, or any module) in place for ``steps``
    optimizer steps and return a :class:`FinetuneReport`.

    ``data``: batches, cycled; without ``loss``, each is an ``(args, kwargs)`` pair for the model with
    the clean latents as ``args[0]`` and the flow-matching loss is used (only for models in
    :data:`FLOW_MATCHING_MODELS`; others raise ValueError). ``loss(model, batch) -> scalar tensor``:
    any other objective (``model`` is ``hybrid``). ``lr``: the original weights' learning rate;
    ``phi_lr``: the feature maps' (default ``10 * lr``); ``train_original=False`` trains the feature
    maps alone. ``seed``: the noise and flow times drawn (rank r uses ``seed + r``).
    Under torchrun each rank takes every N-th batch and gradients are averaged over ranks.
    """
    if not isinstance(hybrid, nn.Module):
        raise TypeError(f"hybrid must be a torch.nn.Module, got {type(hybrid).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable (model, batch) -> scalar tensor, got {type(loss).__name__}")
    if loss is None and not is_flow_matching_model(hybrid):
        raise ValueError(f"{model_class_name(hybrid)} is not known to be trained with flow matching, so finetune has no "
                         "objective for it: pass loss=callable(model, batch) -> scalar tensor (its own training loss). "
                         f"Flow-matching models: {', '.join(sorted(FLOW_MATCHING_MODELS))}")
    if isinstance(data, (torch.Tensor, str)) or not isinstance(data, Iterable):
        raise TypeError("data must be an iterable of batches")
    phi_lr = 10 * lr if phi_lr is None else phi_lr
    start = time.perf_counter()
    distributed = init_distributed() and dist.get_world_size() > 1
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    groups = parameter_groups(hybrid, lr, phi_lr, train_original)
    params = [p for g in groups for p in g["params"]]
    if distributed:
        broadcast_parameters(params)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed + rank)
    was_training = hybrid.training
    hybrid.train()
    curve = []
    bar = _progress(steps, progress and rank == 0, f"finetune ({'custom loss' if loss else 'flow matching'})")
    try:
        for step, batch in zip(range(steps), _batches_forever(data, rank, world)):
            value = loss(hybrid, batch) if loss is not None else flow_matching_step_loss(
                hybrid, _check_batch(batch, step), generator)
            if not (torch.is_tensor(value) and value.dim() == 0):
                raise TypeError(f"loss must return a scalar tensor, got {type(value).__name__}")
            opt.zero_grad(set_to_none=True)
            value.backward()
            if distributed:
                average_gradients(params)
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            opt.step()
            curve.append(float(value.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{curve[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        hybrid.train(was_training)
    return FinetuneReport(curve, len(curve), float(lr), float(phi_lr), "custom" if loss is not None else "flow_matching",
                          time.perf_counter() - start, world)
