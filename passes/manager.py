"""The pass manager: canonicalise, find, classify, infer the layout; decisions returned as data.

:func:`analyse` runs the analysis passes in order over an exported graph and returns one
:class:`Site` per attention (and per linear-attention module, declined), each accepted or declined
with a reason. The rewrite (:mod:`rewrite_attention`) consumes the accepted sites.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .canonicalize import canonicalize
from .classify_attention import as_expr, classify_attention
from .find_attention import AttentionMatch, find_attention
from .infer_video_layout import VideoLayout, frame_major, infer_video_layout


@dataclass
class Site:
    """One attention site and the decision about it (units: tokens, frames)."""

    name: str
    module: str
    kind: str
    form: str
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    layout: VideoLayout | None = None
    rewritable: bool = False
    reason: str = ""
    scale: float | None = None
    key: str = ""
    frame_major: bool | None = None  # True: verified in the graph; None: could not be checked
    chunk_frames: int | None = None  # set on converted sites (HybridModel.sites)
    overlap_frames: int | None = None
    causal: bool | None = None
    match: AttentionMatch | None = field(default=None, repr=False, compare=False)

    @property
    def video(self) -> tuple[int, int, int] | None:
        """(offset, frames, tokens_per_frame) of the video range, or None."""
        if self.layout is None:
            return None
        return self.layout.extra_before, self.layout.frames, self.layout.tokens_per_frame

    @property
    def tokens_per_frame(self) -> int | None:
        return None if self.layout is None else self.layout.tokens_per_frame

    @property
    def extra_before(self) -> int | None:
        return None if self.layout is None else self.layout.extra_before

    @property
    def extra_after(self) -> int | None:
        """Extra tokens after the video; None when unknown or data-dependent (computed in the graph)."""
        return None if self.layout is None else self.layout.extra_after

    @property
    def decision(self) -> str:
        return "convert" if self.rewritable else "keep"

    def to_dict(self) -> dict:
        layout = self.layout
        return {"name": self.name, "module": self.module, "kind": self.kind, "form": self.form,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "video": None if self.video is None else list(self.video),
                "extra_before": None if layout is None else layout.extra_before,
                "extra_after": None if layout is None else layout.extra_after,
                "frame_major": self.frame_major, "rewritable": self.rewritable, "reason": self.reason,
                "scale": self.scale, "chunk_frames": self.chunk_frames, "overlap_frames": self.overlap_frames,
                "causal": self.causal}


def _int_or_none(x):
    expr = as_expr(x)
    return int(expr) if expr.is_Integer else None


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that produced ``node`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export names nested modules like "L['self'].blocks[0]" in some modes; keep the plain dotted path
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "")


def _site_for(match: AttentionMatch, name: str, symbol, patch: int, frames, video_shape) -> Site:
    module = module_path(match.anchor)
    site = Site(name, module, "self", match.form, key=site_key(name), match=match)
    if match.q is not None and isinstance(match.q.meta.get("val"), torch.Tensor):
        q = match.q.meta["val"]
        site.head_dim = _int_or_none(q.shape[-1])
        site.heads = _int_or_none(q.shape[1]) if q.dim() == 4 else None
        k = match.k if match.k is not None else match.k_t
        kval = k.meta.get("val") if k is not None else None
        if isinstance(kval, torch.Tensor) and kval.dim() == 4:
            site.kv_heads = _int_or_none(kval.shape[1])
        site.scale = match.scale
    if not match.found:
        site.reason = match.reason
        return site
    site.kind, site.reason = classify_attention(match, symbol)
    if site.reason:
        return site
    if site.head_dim is None:
        site.reason = "head dim is not a fixed number"
        return site
    vval = match.v.meta["val"]
    if _int_or_none(vval.shape[-1]) != site.head_dim:
        site.reason = f"value head dim {vval.shape[-1]} differs from q/k head dim {site.head_dim}"
        return site
    if site.kv_heads is not None and site.heads is not None and site.heads % site.kv_heads:
        site.reason = f"{site.heads} query heads are not a multiple of {site.kv_heads} key/value heads"
        return site
    if match.mask is not None:
        mask = match.mask.meta.get("val")
        if not isinstance(mask, torch.Tensor) or (mask.dim() >= 2 and _int_or_none(mask.shape[-2]) != 1):
            site.reason = ("query-dependent attention mask: only key masks (broadcast over queries) can be kept, "
                           "the hybrid op has no general mask")
            return site
    site.layout, reason = infer_video_layout(match.q, symbol, patch, frames, video_shape)
    if reason:
        site.reason = reason
        return site
    site.kind = "joint" if (site.layout.extra_before or site.layout.extra_after != 0) else "self"
    site.frame_major = frame_major(match.q, site.layout, symbol, patch)
    if site.frame_major is False:
        site.reason = ("video tokens are not frame-major (time is not the slowest axis of the merge that "
                       "builds them): chunks of the token axis would not be frames")
        return site
    site.rewritable = True
    return site


def site_key(name: str) -> str:
    """A ModuleDict-safe key for a site name (dots and colons become underscores)."""
    return name.replace(".", "_").replace(":", "_") or "root"


def _linear_attention_sites(model: torch.nn.Module | None, gm: fx.GraphModule, taken: set) -> list[Site]:
    """Attention modules whose processor is a linear attention (no softmax anywhere in them): declined."""
    if model is None:
        return []
    used = {module_path(n) for n in gm.graph.nodes if n.op == "call_function"}
    sites = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        kind = type(processor).__name__ if processor is not None else ""
        if "Linear" in kind and name in used and name not in taken:
            sites.append(Site(name, name, "self", "linear-attention", heads=getattr(module, "heads", None),
                              key=site_key(name), reason=f"linear attention ({kind}): no softmax to convert, "
                              "already linear in the number of tokens"))
    return sites


def analyse(gm: fx.GraphModule, frame_axis, model: torch.nn.Module | None = None) -> list[Site]:
    """Canonicalise ``gm`` in place, then find, classify and lay out every attention. Graph order."""
    canonicalize(gm)
    matches = find_attention(gm)
    frames = None if frame_axis.size is None else frame_axis.size // frame_axis.patch
    counts: dict[str, int] = {}
    sites = []
    for match in matches:
        module = module_path(match.anchor)
        index = counts.get(module, 0)
        counts[module] = index + 1
        name = module if index == 0 else f"{module}:{index}"
        sites.append(_site_for(match, name or "<root>", frame_axis.symbol, frame_axis.patch, frames,
                               frame_axis.video_shape))
    sites += _linear_attention_sites(model, gm, {s.module for s in sites})
    return sites
