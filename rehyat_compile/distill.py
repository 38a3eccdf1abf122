"""Stage 1 of the ReHyAt recipe: distil each converted site's feature maps from the teacher.

Every converted site is one ``rehyat::hybrid_attention`` call. Distillation needs, per site, the
q, k, v the *teacher* computes there and the teacher's attention output: each site is trained on
the teacher's own activations (Attention Surgery), so errors of earlier converted layers never
reach later ones during training. They are captured by running the hybrid's rewritten graph with
every site *forced to softmax*: the site node computes full softmax attention of its q, k, v
(= the op with one chunk covering the video, docs/hybrid_attention.md consequence 1), which is exactly the teacher,
and records q, k, v and that output. The teacher itself is run once per batch to check this.

Then only phi_q, phi_k of each site are trained to make ``rc.hybrid_attention(q, k, v, phi_q(q),
phi_k(k), <site layout>)`` match the teacher output. Sites are independent problems; sites with
equal shapes and feature-map configs are trained together as one wider op call (their heads
concatenated: the op and the feature map are per-head, the loss is a sum of per-site means and
Adam is element-wise, so the batched run takes the same steps as separate runs).

Scale-out: under ``torch.distributed`` (torchrun; NCCL on GPUs, gloo on CPU) sites are sharded over
ranks, each rank captures and trains its own sites, and the trained weights are broadcast from their
owners, so every rank ends with the whole trained hybrid and the same report.

Data shapes: q, k, v, teacher output ``[B, H, N, D]`` with ``N = extra_before + frames *
tokens_per_frame + extra_after``. Errors are relative L1, ``sum|y - y_teacher| / sum|y_teacher|``.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .attention import HybridLayout, attention_masks, make_layout, resolve_scale
from .errors import ConversionError
from .feature_map import FeatureMap
from .op import HybridCall, hybrid_attention, is_hybrid_node
SITE_META = "rehyat_site"
LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


# ---------------------------------------------------------------------------------------------
# Data: one site's layout and its captured samples
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteSpec:
    """What the trainer needs to know about a converted site: its name, where the video sits in the
    token axis and how it is chunked, and the softmax scale."""

    name: str
    layout: HybridLayout
    scale: float | None = None

    def op_kwargs(self) -> dict:
        return dict(tokens_per_frame=self.layout.tokens_per_frame, chunk_frames=self.layout.chunk_frames,
                    overlap_frames=self.layout.overlap_frames, causal=self.layout.causal,
                    extra_before=self.layout.extra_before, extra_after=self.layout.extra_after, scale=self.scale)

    @classmethod
    def from_call(cls, name: str, call: HybridCall) -> SiteSpec:
        """From the op's call at the site (its layout and scale)."""
        layout = {k: v for k, v in call.layout.items() if k != "scale"}
        return cls(name, make_layout(**layout), float(call.scale))


@dataclass
class SiteSample:
    """One batch at one site: the teacher's q, k, v (as the op takes them) and its attention output,
    all [B, H, N, D]; ``q_phi``, ``k_phi``: what the feature maps read when that differs from q, k
    (a folded key mask adds a column to the op's q, k that the feature maps never see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    target: torch.Tensor
    q_phi: torch.Tensor | None = None
    k_phi: torch.Tensor | None = None

    FIELDS = ("q", "k", "v", "target", "q_phi", "k_phi")

    def features_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.q if self.q_phi is None else self.q_phi, self.k if self.k_phi is None else self.k_phi)

    def to(self, device) -> SiteSample:
        return SiteSample(*(None if t is None else t.to(device) for t in map(self.__getattribute__, self.FIELDS)))


def teacher_attention(q, k, v, scale=None) -> torch.Tensor:
    """The teacher's output at a self-attention site: full softmax attention over every token."""
    return F.scaled_dot_product_attention(q, k, v, scale=resolve_scale(scale, q.shape[-1]))


def structured_attention_inputs(batch, heads, frames, tokens_per_frame, head_dim, *, rank=4, sharpness=3.0,
                                seed=0, device=None, dtype=torch.float32):
    """Synthetic q, k, v [B, H, N, D] shaped like a video DiT's (for tests and benchmarks, not white
    noise): q and k share a low-rank smooth signal of the token's frame position, so a token attends
    most to tokens at nearby frames, plus a low-rank per-token content part; ``sharpness`` scales q,
    making attention peaky. v is Gaussian."""
    g = torch.Generator().manual_seed(seed)
    n = frames * tokens_per_frame
    pos = torch.arange(n, dtype=torch.float32) / tokens_per_frame
    freqs = torch.rand(rank, generator=g) * math.pi / 2
    phases = torch.rand(rank, generator=g) * 2 * math.pi
    angle = pos[:, None] * freqs + phases
    basis = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1) / math.sqrt(2 * rank)
    mix_q = torch.randn(heads, 2 * rank, head_dim, generator=g)
    mix_k = mix_q + 0.3 * torch.randn(heads, 2 * rank, head_dim, generator=g)
    content = (torch.randn(batch, heads, n, rank, generator=g) @ torch.randn(heads, rank, head_dim, generator=g)
               ) * (0.5 / math.sqrt(rank))
    q = sharpness * (basis @ mix_q + content)
    k = basis @ mix_k + content
    v = torch.randn(batch, heads, n, head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def relative_l1(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(sum |pred - target|, sum |target|) in fp32, so errors over several batches add up."""
    return (float((pred.float() - target.float()).abs().sum()), float(target.float().abs().sum()))


# ---------------------------------------------------------------------------------------------
# Attention-weight distillation (Hedgehog / LoLCATs): match the weights, not only the output
# ---------------------------------------------------------------------------------------------

def hybrid_log_weights(q, k, fq, fk, layout: HybridLayout, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log A, allowed): the log of the hybrid op's effective attention weights ``[B, H, N, N]``
    (REHYAT.md: window softmax ``w`` and linear scores ``l``, both divided by ``1 + sum l``) and the
    bool mask of keys a query may weigh at all (window or linear part). fp32, O(N^2): a reference."""
    scale = resolve_scale(scale, q.shape[-1])
    window, linear = attention_masks(layout, q.shape[2], q.device)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    log_window = torch.log_softmax(scores.masked_fill(~window, float("-inf")), dim=-1)
    lin = (fq.float() @ fk.float().transpose(-1, -2)) * linear
    log_norm = torch.log1p(lin.sum(-1, keepdim=True))
    log_a = torch.where(window, log_window, torch.log(lin.clamp_min(1e-30))) - log_norm
    return log_a, window | linear


def teacher_log_weights(q, k, allowed, scale=None) -> torch.Tensor:
    """log of the teacher's softmax weights renormalised over the keys the hybrid can reach
    (``allowed``: a causal hybrid cannot weigh future frames, so their share is not asked of it)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * resolve_scale(scale, q.shape[-1])
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def attention_weight_kl(q, k, fq, fk, layout: HybridLayout, scale=None) -> torch.Tensor:
    """Mean over queries of KL(teacher weights || hybrid weights) on the reachable keys, per head
    ``[B, H]``: Hedgehog's attention-weight distillation objective for the hybrid op."""
    log_a, allowed = hybrid_log_weights(q, k, fq, fk, layout, scale)
    log_p = teacher_log_weights(q, k, allowed, scale)
    p = log_p.exp()
    return (p * (log_p - log_a)).masked_fill(~allowed, 0.0).sum(-1).mean(-1)


def _attention_weight_loss(group, sample: SiteSample) -> torch.Tensor:
    """Per-site attention-weight KL of one sample for a site group (``loss='attention_weights'``)."""
    device = group.phi_q.w1.device
    sample = sample.to(device) if sample.q.device != device else sample
    q_in, k_in = sample.features_in()
    kl = attention_weight_kl(sample.q, sample.k, group.phi_q(q_in.float()), group.phi_k(k_in.float()),
                             group.spec.layout, group.spec.scale)                      # [B, G*H]
    return kl.reshape(kl.shape[0], len(group.names), group.heads).mean(dim=(0, 2))


def _output_and_weight_loss(group, sample: SiteSample, weight: float = 0.1) -> torch.Tensor:
    """LoLCATs-style blend: output L1 plus ``weight`` x the attention-weight KL, per site."""
    pred = group.per_site(group.forward(sample).float())
    target = group.per_site(sample.target.to(pred.device, torch.float32))
    out = torch.stack([F.l1_loss(p, t) for p, t in zip(pred, target)])
    return out + weight * _attention_weight_loss(group, sample)


_attention_weight_loss.reads_sample = True
_output_and_weight_loss.reads_sample = True
LOSSES["attention_weights"] = _attention_weight_loss
LOSSES["l1+attention_weights"] = _output_and_weight_loss


def reinit_feature_maps(hybrid: nn.Module, **options) -> int:
    """Replace every site's phi_q, phi_k of ``hybrid`` (a HybridModel) with fresh :class:`FeatureMap`
    modules of the same heads, head and feature size built with ``options`` (e.g. ``positive='exp'``
    for softmax-mimicking exponential features, ``init_bias=``, ``hidden=``, ``degree=``), on the old
    maps' device and dtype. Returns the number of sites. Options other than the defaults are not
    stored by ``rc.save_hybrid``: keep them beside the file."""
    count = 0
    for pair in hybrid.feature_maps.values():
        for which in ("phi_q", "phi_k"):
            old = getattr(pair, which)
            new = FeatureMap(old.heads, old.head_dim, old.feature_dim, **options)
            setattr(pair, which, new.to(device=old.w1.device, dtype=old.w1.dtype))
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Capture: run the rewritten graph with every site forced to softmax
# ---------------------------------------------------------------------------------------------

class _SoftmaxTap(nn.Module):
    """Replaces one site node: returns the teacher's softmax attention and records q, k, v, output."""

    def __init__(self, name: str, record: bool, sink: dict, offload):
        super().__init__()
        self.name, self.record, self.sink, self.offload = name, record, sink, offload

    def forward(self, *args):
        call = HybridCall.from_args(args)
        q, k, v, q_phi, k_phi = call.tensors
        out = teacher_attention(q, k, v, call.scale)
        if self.record:
            q_phi, k_phi = (None if x is None or x is y else x.detach() for x, y in ((q_phi, q), (k_phi, k)))
            sample = SiteSample(q.detach(), k.detach(), v.detach(), out.detach(), q_phi, k_phi)
            self.sink.setdefault(self.name, []).append(sample if self.offload is None else sample.to(self.offload))
            self.sink.setdefault("__specs__", {})[self.name] = SiteSpec.from_call(self.name, call)
        return out


def site_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """The hybrid-op nodes of a rewritten graph, by site name (``node.meta['rehyat_site']``)."""
    nodes = {}
    for node in gm.graph.nodes:
        if is_hybrid_node(node):
            name = node.meta.get(SITE_META)
            if name is None:
                raise ConversionError(f"hybrid-attention node {node.name} has no meta[{SITE_META!r}] site name")
            nodes[name] = node
    return nodes


def _feature_map_input(node):
    """The tensor a feature-map node reads (``phi(x)`` as call_module), else None (then q / k)."""
    if isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def site_feature_maps(gm: torch.fx.GraphModule) -> dict[str, tuple[FeatureMap, FeatureMap]]:
    """``{site name: (phi_q, phi_k)}``: the modules the rewritten graph calls for fq, fk."""
    maps = {}
    for name, node in site_nodes(gm).items():
        pair = []
        call = HybridCall.from_node(node)
        for arg, which in ((call.fq, "fq"), (call.fk, "fk")):
            if not (isinstance(arg, torch.fx.Node) and arg.op == "call_module"):
                raise ConversionError(f"site {name}: {which} is not computed by a feature-map module call")
            module = gm.get_submodule(arg.target)
            if not isinstance(module, FeatureMap):
                raise ConversionError(f"site {name}: {arg.target} is a {type(module).__name__}, not a FeatureMap")
            pair.append(module)
        maps[name] = tuple(pair)
    return maps


def softmax_forced(gm: torch.fx.GraphModule, record=None, offload=None) -> tuple[torch.fx.GraphModule, dict]:
    """A copy of ``gm`` (sharing its parameters) in which every site runs full softmax attention of
    its own q, k, v -- the teacher -- and the sites named in ``record`` (None = all) append their
    :class:`SiteSample` to the returned sink (``sink[name]`` is a list, ``sink['__specs__']`` the specs).
    The feature maps become dead code and are dropped."""
    sink: dict = {}
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, val_map := {})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    forced = torch.fx.GraphModule(gm, graph)
    for spec in ("_in_spec", "_out_spec"):  # read by the pytree codegen of exported modules
        if hasattr(gm, spec):
            setattr(forced, spec, getattr(gm, spec))
    for i, (name, node) in enumerate(site_nodes(gm).items()):
        new, tap = val_map[node], f"_rehyat_softmax_tap_{i}"
        forced.add_module(tap, _SoftmaxTap(name, record is None or name in record, sink, offload))
        call = HybridCall.from_node(new)
        new.op, new.target, new.kwargs = "call_module", tap, {}
        new.args = call.replace(fq=_feature_map_input(call.fq), fk=_feature_map_input(call.fk)).to_args()
    # the feature maps now feed nothing; their dtype assertions alone must not keep them alive
    forced.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.target is not torch.ops.aten._assert_tensor_metadata.default and n.is_impure())
    forced.recompile()
    return forced, sink


def capture_sites(gm: torch.fx.GraphModule, batches, *, record=None, offload=None):
    """Run the softmax-forced graph on ``batches`` ((args, kwargs) pairs). Returns
    ``(samples, specs, outputs)``: ``samples[name]`` one :class:`SiteSample` per batch for the recorded
    sites, ``specs[name]`` their :class:`SiteSpec`, ``outputs`` the graph's output per batch."""
    from .passes import pipeline  # the pipeline's force_softmax pass is softmax_forced
    result = pipeline.run(pipeline.FORCE_SOFTMAX, pipeline.PassResult(gm),
                          pipeline.PassContext(settings={"record": record, "offload": offload}))
    forced, sink = result.graph, result.artifacts["capture"]
    outputs = []
    with torch.no_grad():
        for args, kwargs in batches:
            outputs.append(forced(*args, **kwargs))
    specs = sink.pop("__specs__", {})
    return sink, specs, outputs


# ---------------------------------------------------------------------------------------------
# Training: only phi_q, phi_k, batched over sites of equal shapes
# ---------------------------------------------------------------------------------------------

@dataclass
class SiteResult:
    """Per-site outcome: relative L1 attention error before/after, the training loss per step, and
    what the cost model needs (``shape`` = q's [B, H, N, D] of the first sample, ``feature_dim``,
    ``layout`` = the op's layout arguments), and the rank that trained it."""

    name: str
    error_before: float
    error_after: float
    loss_curve: list[float] = field(default_factory=list)
    shape: tuple = ()
    feature_dim: int = 0
    layout: dict = field(default_factory=dict)
    rank: int = 0
    error_curve: list = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def improvement(self) -> float:
        return self.error_before / self.error_after if self.error_after > 0 else math.inf


def _phi_config(phi: FeatureMap) -> tuple:
    return (phi.heads, phi.head_dim, phi.feature_dim, phi.hidden, phi.degree, phi.activation, phi.positive,
            phi.w1.dtype, phi.w1.device)


def _stack_feature_maps(maps: list[FeatureMap]) -> FeatureMap:
    """One FeatureMap whose heads are the concatenated heads of ``maps`` (all of one config)."""
    first = maps[0]
    stacked = FeatureMap(first.heads * len(maps), first.head_dim, feature_dim=first.feature_dim,
                         hidden=first.hidden, degree=first.degree, activation=first.activation,
                         positive=first.positive).to(device=first.w1.device, dtype=first.w1.dtype)
    with torch.no_grad():
        for name, param in stacked.named_parameters():
            param.copy_(torch.cat([getattr(m, name) for m in maps], dim=0))
    return stacked


def _unstack_feature_maps(stacked: FeatureMap, maps: list[FeatureMap]) -> None:
    with torch.no_grad():
        for name, param in stacked.named_parameters():
            for m, part in zip(maps, param.chunk(len(maps), dim=0)):
                getattr(m, name).copy_(part)


def _cat_samples(samples: list[SiteSample]) -> SiteSample:
    """Sites' samples side by side on the head axis."""
    def cat(field):
        parts = [getattr(s, field) for s in samples]
        if field in ("q_phi", "k_phi") and all(p is None for p in parts):
            return None
        if field in ("q_phi", "k_phi"):
            parts = [s.features_in()[field == "k_phi"] for s in samples]
        return torch.cat(parts, dim=1)
    return SiteSample(*map(cat, SiteSample.FIELDS))


class _SiteGroup:
    """Sites trained as one op call: same layout, scale, sample shapes and feature-map config."""

    def __init__(self, spec: SiteSpec, names: list[str], samples: dict, feature_maps: dict,
                 compute_dtype: torch.dtype | None = torch.float32):
        self.spec, self.names, self.heads = spec, names, samples[names[0]][0].q.shape[1]
        self.compute_dtype = compute_dtype
        # concatenate the sites' heads once, freeing the per-site copies
        self.samples = [_cat_samples([samples[n][i] for n in names]) for i in range(len(samples[names[0]]))]
        self.phi_q = _stack_feature_maps([feature_maps[n][0] for n in names])
        self.phi_k = _stack_feature_maps([feature_maps[n][1] for n in names])

    def parameters(self):
        return [*self.phi_q.parameters(), *self.phi_k.parameters()]

    @torch.no_grad()
    def calibrate(self, target: float = 1.0, iterations: int = 40) -> None:
        """Shift both feature maps' output bias per head so that at the start the linear part weighs
        about ``target`` against the softmax window (mean phi_q . z over queries, z summed over half
        the tokens). A fresh map on a long sequence otherwise gives phi_q . z in the thousands: the
        linear average drowns the window and the first steps crush the features into softplus's flat
        tail, where they stop learning."""
        sample = self.samples[0]
        q_in, k_in = sample.features_in()
        q_in, k_in = q_in.float(), k_in.float()
        n = q_in.shape[2]
        base_q, base_k = self.phi_q.b2.clone(), self.phi_k.b2.clone()
        lo = torch.full((self.phi_q.heads, 1, 1), -40.0, device=base_q.device, dtype=base_q.dtype)
        hi = torch.full_like(lo, 10.0)
        for _ in range(iterations):  # weight grows monotonically with the shift: bisect per head
            mid = (lo + hi) / 2
            self.phi_q.b2.copy_(base_q + mid)
            self.phi_k.b2.copy_(base_k + mid)
            fq, fk = self.phi_q(q_in), self.phi_k(k_in)
            weight = (fq * fk.mean(dim=2, keepdim=True)).sum(-1).mean(dim=(0, 2)) * (n / 2)  # [heads]
            too_big = (weight > target).view(-1, 1, 1)
            hi = torch.where(too_big, mid, hi)
            lo = torch.where(too_big, lo, mid)
        shift = (lo + hi) / 2
        self.phi_q.b2.copy_(base_q + shift)
        self.phi_k.b2.copy_(base_k + shift)

    def forward(self, sample: SiteSample) -> torch.Tensor:
        device = self.phi_q.w1.device
        if sample.q.device != device:  # offloaded captures come back one sample at a time
            sample = sample.to(device)
        # 16-bit activations run in compute_dtype (fp32 by default): the loss and its gradients then
        # see phi updates smaller than a bf16 output step
        q, k, v, (q_in, k_in) = sample.q, sample.k, sample.v, sample.features_in()
        if q.element_size() < 4 and self.compute_dtype is not None:
            q, k, v, q_in, k_in = (t.to(self.compute_dtype) for t in (q, k, v, q_in, k_in))
        return hybrid_attention(q, k, v, self.phi_q(q_in), self.phi_k(k_in), **self.spec.op_kwargs())

    def per_site(self, t: torch.Tensor) -> torch.Tensor:
        """[B, G*H, N, D] -> [G, B, H, N, D]."""
        b, _, n, d = t.shape
        return t.reshape(b, len(self.names), self.heads, n, d).transpose(0, 1)

    def losses(self, sample: SiteSample, loss_fn) -> torch.Tensor:
        if getattr(loss_fn, "reads_sample", False):  # losses on attention weights need q, k, phi
            return loss_fn(self, sample)
        pred = self.per_site(self.forward(sample).float())
        target = self.per_site(sample.target.to(pred.device, torch.float32))
        return torch.stack([loss_fn(p, t) for p, t in zip(pred, target)])

    @torch.no_grad()
    def errors(self, samples: list[SiteSample]) -> list[float]:
        num, den = torch.zeros(len(self.names)), torch.zeros(len(self.names))
        for sample in samples:
            pred = self.forward(sample).float()
            target = sample.target.to(pred.device, torch.float32)
            num += self.per_site(pred - target).abs().flatten(1).sum(1).cpu()
            den += self.per_site(target).abs().flatten(1).sum(1).cpu()
        return (num / den.clamp_min(1e-30)).tolist()

    def write_back(self, feature_maps: dict) -> None:
        _unstack_feature_maps(self.phi_q, [feature_maps[n][0] for n in self.names])
        _unstack_feature_maps(self.phi_k, [feature_maps[n][1] for n in self.names])


def _group_sites(samples: dict, specs: Mapping[str, SiteSpec], feature_maps: dict,
                 compute_dtype: torch.dtype | None = torch.float32) -> list[_SiteGroup]:
    keys: dict[tuple, list[str]] = {}
    for name in sorted(samples):
        if not samples[name]:
            raise ValueError(f"no captured samples for site {name!r}")
        shapes = tuple((s.q.shape, s.features_in()[0].shape, s.q.dtype, s.q.device) for s in samples[name])
        phi_q, phi_k = feature_maps[name]
        key = (specs[name].layout, specs[name].scale, shapes, _phi_config(phi_q), _phi_config(phi_k))
        keys.setdefault(key, []).append(name)
    return [_SiteGroup(specs[names[0]], names, samples, feature_maps, compute_dtype) for names in keys.values()]


def _check_training_args(steps, lr, loss):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")


def train_feature_maps(samples: Mapping[str, list[SiteSample]], specs: Mapping[str, SiteSpec],
                       feature_maps: Mapping[str, tuple[FeatureMap, FeatureMap]], *, steps: int = 200,
                       lr: float = 3e-3, loss: str = "l1", progress: bool = True,
                       eval_samples: Mapping[str, list[SiteSample]] | None = None,
                       eval_every: int = 0, calibrate: bool = True,
                       compute_dtype: torch.dtype | None = torch.float32) -> dict[str, SiteResult]:
    """Train ``feature_maps[name] = (phi_q, phi_k)`` of every site in ``samples`` so the hybrid op with
    ``specs[name]``'s layout matches the recorded teacher output. Step s uses sample ``s % len``.
    AdamW with a cosine decay to lr/10. 16-bit activations are computed in ``compute_dtype`` (fp32;
    None keeps their dtype: ~3x faster on an H200 at Wan2.1-1.3B size, coarser loss). Errors (relative L1) are measured on ``eval_samples``
    (default: the training samples) before and after, and every ``eval_every`` steps (0 = never) into
    ``error_curve``; ``train_seconds`` is the wall time of the optimisation steps alone (all sites of
    this call). ``calibrate``: first rescale each site's features so the linear part starts at about
    the softmax window's weight (:meth:`_SiteGroup.calibrate`); the "before" error is measured before
    that. The feature maps are updated in place."""
    _check_training_args(steps, lr, loss)
    for name in samples:
        if name not in specs or name not in feature_maps:
            raise ValueError(f"site {name!r} has samples but no spec/feature maps")
    groups = _group_sites(dict(samples), specs, feature_maps, compute_dtype)
    evals = {g: _SiteGroup(g.spec, g.names, eval_samples, feature_maps).samples if eval_samples else g.samples
             for g in groups}
    before = {n: e for g in groups for n, e in zip(g.names, g.errors(evals[g]))}
    curves: dict[str, list[float]] = {n: [] for g in groups for n in g.names}
    error_curves: dict[str, list] = {n: [(0, e)] for n, e in before.items()}
    params = [p for g in groups for p in g.parameters()]
    if calibrate and steps:
        for g in groups:
            g.calibrate()
    train_seconds = 0.0
    if params and steps:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
        bar = _progress(steps, progress, f"distill {len(curves)} sites")
        for step in range(steps):
            tick = _synchronized_clock(params[0].device)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for g in groups:
                per_site = g.losses(g.samples[step % len(g.samples)], LOSSES[loss])
                per_site.sum().backward()  # groups share no parameters: one backward each keeps memory low
                for n, value in zip(g.names, per_site.tolist()):
                    curves[n].append(value)
                    total += value
            opt.step()
            sched.step()
            train_seconds += _synchronized_clock(params[0].device) - tick
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                for g in groups:
                    for n, e in zip(g.names, g.errors(evals[g])):
                        error_curves[n].append((step + 1, e))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / max(len(curves), 1):.4g}")
        if bar is not None:
            bar.close()
    after = {n: e for g in groups for n, e in zip(g.names, g.errors(evals[g]))}
    for g in groups:
        g.write_back(feature_maps)
    info = {n: (tuple(g.samples[0].q.shape[:1]) + (g.heads,) + tuple(g.samples[0].q.shape[2:]), g.phi_q.feature_dim,
                {**asdict(g.spec.layout), "scale": g.spec.scale}) for g in groups for n in g.names}
    for n, e in after.items():
        if steps:
            error_curves[n].append((steps, e))
    return {n: SiteResult(n, before[n], after[n], curves[n], *info[n], error_curve=error_curves[n],
                          train_seconds=train_seconds) for n in sorted(curves)}


def _synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------------
# Scale-out over torch.distributed ranks
# ---------------------------------------------------------------------------------------------

def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment) if not joined
    yet: NCCL when CUDA is available, else gloo. Returns whether a multi-process group is active."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.is_initialized() and dist.get_world_size() > 1


def shard_sites(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Owner rank of every site: longest-processing-time greedy on ``costs`` (any consistent unit),
    deterministic so every rank computes the same plan."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


def _site_cost(spec: SiteSpec, q_shape) -> float:
    """Rough training cost of a site (softmax-window FLOPs of one op call), for load balancing."""
    b, h, n, d = q_shape
    window = (spec.layout.chunk_frames + spec.layout.overlap_frames) * spec.layout.tokens_per_frame
    return float(b * h * n * d * (min(window, n) + spec.layout.extra))


def broadcast_feature_maps(feature_maps: Mapping[str, tuple[FeatureMap, FeatureMap]],
                           owner: Mapping[str, int]) -> None:
    """Copy every site's phi weights from its owner rank to all ranks (one flat tensor per site)."""
    on_gpu = dist.get_backend() == "nccl"
    for name in sorted(owner):
        params = [*feature_maps[name][0].parameters(), *feature_maps[name][1].parameters()]
        flat = nn.utils.parameters_to_vector(params).detach()
        wire = flat.cuda() if on_gpu and not flat.is_cuda else flat
        dist.broadcast(wire, src=owner[name])
        nn.utils.vector_to_parameters(wire.to(flat.device), params)


def gather_results(results: dict[str, SiteResult]) -> dict[str, SiteResult]:
    """Every rank's site results, merged on all ranks."""
    rank = dist.get_rank()
    for r in results.values():
        r.rank = rank
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {n: asdict(r) for n, r in results.items()})
    return {n: SiteResult(**r) for part in parts for n, r in part.items()}


def train_sharded(samples, specs, feature_maps, *, owner: Mapping[str, int] | None = None, **train_kwargs):
    """:func:`train_feature_maps` on this rank's sites (``owner[name] == rank``; ``samples`` needs only
    those), then broadcast of the trained weights and a gather of the results. Without a process
    group this is plain :func:`train_feature_maps` on all sites."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return train_feature_maps(samples, specs, feature_maps, **train_kwargs)
    if owner is None:
        raise ValueError("owner (site -> rank) is required under torch.distributed")
    mine = {n: s for n, s in samples.items() if owner[n] == dist.get_rank()}
    results = train_feature_maps(mine, specs, feature_maps, **train_kwargs)
    broadcast_feature_maps(feature_maps, owner)
    return gather_results(results)


# ---------------------------------------------------------------------------------------------
# rc.distill: capture from the hybrid's graph, train, report
# ---------------------------------------------------------------------------------------------

@dataclass
class DistillReport:
    """What :func:`distill` did. ``per_layer[site]``: :class:`SiteResult` (relative L1 attention error
    before/after, loss curve); ``loss_curve``: mean site loss per step; ``model_error_before/after``:
    relative L1 of the hybrid's whole output against the teacher's (None when not measured);
    ``teacher_check_error``: the softmax-forced graph against the teacher (~0: capture is faithful)."""

    per_layer: dict[str, SiteResult]
    loss_curve: list[float]
    model_error_before: float | None
    model_error_after: float | None
    teacher_check_error: float | None
    steps: int
    lr: float
    loss: str
    seconds: float
    world_size: int = 1

    def errors(self, when: str = "after") -> dict[str, float]:
        """``{site: error}`` after (or ``when='before'``) distillation."""
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}")
        return {n: getattr(r, f"error_{when}") for n, r in self.per_layer.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"distill: {len(self.per_layer)} sites, {self.steps} steps, lr={self.lr:g}, loss={self.loss}, "
                 f"{self.seconds:.1f} s on {self.world_size} process(es)",
                 f"{'site':<32} {'Tc':>3} {'To':>3} {'error before':>13} {'error after':>12} {'ratio':>7}"]
        for n, r in self.per_layer.items():
            lines.append(f"{n:<32} {r.layout.get('chunk_frames', '-'):>3} {r.layout.get('overlap_frames', '-'):>3} "
                         f"{r.error_before:>13.4f} {r.error_after:>12.4f} {r.error_after / max(r.error_before, 1e-30):>7.3f}")
        if self.model_error_before is not None:
            lines.append(f"whole model output vs teacher: {self.model_error_before:.4f} -> {self.model_error_after:.4f}")
        if self.teacher_check_error is not None:
            lines.append(f"capture check (softmax-forced graph vs teacher): {self.teacher_check_error:.2e}")
        return "\n".join(lines)


def site_errors(hybrid: nn.Module, batches, *, offload=None) -> dict[str, float]:
    """Relative L1 attention error of every converted site of ``hybrid`` on ``batches`` ((args, kwargs)
    pairs), each site fed the teacher's own activations -- the quantity :func:`distill` minimises."""
    batches = _check_batches(batches)
    samples, specs, maps = {}, {}, {}
    for args, kwargs in batches:
        gm = hybrid.graph_module(*args, **kwargs)
        maps.update(site_feature_maps(gm))
        got, sp, _ = capture_sites(gm, [(args, kwargs)], offload=offload)
        for n, lst in got.items():
            samples.setdefault(n, []).extend(lst)
        specs.update(sp)
    return {n: e for g in _group_sites(samples, specs, maps) for n, e in zip(g.names, g.errors(g.samples))}


def _check_batches(batches) -> list[tuple[tuple, dict]]:
    if isinstance(batches, (torch.Tensor, str)) or not isinstance(batches, Iterable):
        raise TypeError("batches must be an iterable of (args, kwargs) pairs")
    out = []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], (tuple, list))
                and isinstance(batch[1], Mapping)):
            raise TypeError(f"batches[{i}] must be an (args tuple, kwargs dict) pair, got {type(batch).__name__}")
        out.append((tuple(batch[0]), dict(batch[1])))
    if not out:
        raise ValueError("batches must hold at least one (args, kwargs) pair")
    return out


def output_error(outputs, references) -> float:
    """Relative L1 over every floating tensor leaf of paired model outputs."""
    num = den = 0.0
    for out, ref in zip(outputs, references):
        for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                n, d = relative_l1(a, b)
                num, den = num + n, den + d
    return num / den if den else 0.0


def _run(model, batches):
    with torch.no_grad():
        return [model(*args, **kwargs) for args, kwargs in batches]


def distill(teacher: nn.Module, hybrid: nn.Module, batches, *, steps: int = 200, lr: float = 3e-3,
            loss: str = "l1", progress: bool = True, eval_batches=None, offload=None,
            measure_model: bool = True, check_tol: float = 1e-2, calibrate: bool = True,
            compute_dtype: torch.dtype | None = torch.float32) -> DistillReport:
    """Train the feature maps of every converted site of ``hybrid`` to match ``teacher`` site by site.

    ``batches``: (args, kwargs) pairs for the teacher (e.g. latents at several noise levels); each site
    is trained on the teacher's own q, k, v (captured through ``hybrid.graph_module(*args, **kwargs)``
    with every site forced to softmax) to reproduce the teacher's attention output through the hybrid
    op. ``eval_batches``: measure errors on these instead of the training batches. ``offload``: a
    device to keep captured activations on (e.g. "cpu") between steps. ``measure_model``: run both
    models on the batches before and after to report the whole-output error. ``check_tol``: maximum
    relative L1 between the softmax-forced graph and ``teacher`` -- a larger gap means ``teacher`` is
    not the model ``hybrid`` was converted from, and raises ValueError. ``calibrate``, ``compute_dtype``:
    see :func:`train_feature_maps`.

    Under ``torch.distributed`` (or torchrun's environment) sites are sharded over ranks and every rank
    ends with all trained weights. Returns a :class:`DistillReport`; the weights are trained in place.
    """
    _check_training_args(steps, lr, loss)
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if not callable(getattr(hybrid, "graph_module", None)):
        raise TypeError(f"hybrid must be the result of rc.transform (a HybridModel), got {type(hybrid).__name__}")
    start = time.perf_counter()
    batches = _check_batches(batches)
    evals = None if eval_batches is None else _check_batches(eval_batches)
    distributed = init_distributed()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)

    graphs = [hybrid.graph_module(*args, **kwargs) for args, kwargs in batches]
    feature_maps: dict = {}
    for gm in graphs:
        feature_maps.update(site_feature_maps(gm))
    owner = shard_sites({n: float(q.heads * q.head_dim) for n, (q, _) in feature_maps.items()}, world)
    mine = {n for n, r in owner.items() if r == rank}

    def capture(pairs):
        samples: dict = {}
        specs: dict = {}
        outputs = []
        for gm, pair in zip([hybrid.graph_module(*a, **k) for a, k in pairs], pairs):
            s, sp, out = capture_sites(gm, [pair], record=mine, offload=offload)
            for n, lst in s.items():
                samples.setdefault(n, []).extend(lst)
            specs.update(sp)
            outputs += out
        return samples, specs, outputs

    samples, specs, forced_out = capture(batches)
    eval_samples = capture(evals)[0] if evals is not None else None
    teacher_out = _run(teacher, batches)
    check = output_error(forced_out, teacher_out)
    if check > check_tol:
        raise ValueError(f"teacher: the hybrid with every site forced to softmax differs from teacher by {check:.3g} "
                         f"(relative L1 > check_tol={check_tol}); teacher must be the model hybrid was converted from")
    del forced_out
    reference = teacher_out if evals is None else _run(teacher, evals)
    measure_on = batches if evals is None else evals
    before = output_error(_run(hybrid, measure_on), reference) if measure_model else None
    results = train_sharded(samples, specs, feature_maps, owner=owner, steps=steps, lr=lr, loss=loss,
                            progress=progress, eval_samples=eval_samples, calibrate=calibrate,
                            compute_dtype=compute_dtype)
    after = output_error(_run(hybrid, measure_on), reference) if measure_model else None
    curves = [r.loss_curve for r in results.values() if r.loss_curve]
    mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))] if curves else []
    return DistillReport(dict(sorted(results.items())), mean_curve, before, after, check, steps, float(lr), loss,
                         time.perf_counter() - start, world)
