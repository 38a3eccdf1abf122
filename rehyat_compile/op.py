"""``rehyat::hybrid_attention`` as a torch.library custom op.

One node in ``torch.export`` graphs, a fake (meta) implementation for symbolic shapes, autograd
through the chunk-parallel PyTorch form, a FLOP formula registered with
``torch.utils.flop_counter`` (the same :func:`hybrid_attention_flops` the cost model uses), and a
decomposition into standard aten ops for backends that cannot take custom ops.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx
from torch.utils.flop_counter import register_flop_formula

from .attention import (HybridState, hybrid_attention_chunked, hybrid_attention_step_eager, make_layout, resolve_scale,
                        validate_inputs)
from .kernels import hybrid_attention_cuda

OP_NAME = "rehyat::hybrid_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def _hybrid_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor,
                         fk: torch.Tensor, tokens_per_frame: int, chunk_frames: int, overlap_frames: int,
                         causal: bool, extra_before: int, extra_after: int, scale: float) -> torch.Tensor:
    out = hybrid_attention_chunked(q, k, v, fq, fk, tokens_per_frame=tokens_per_frame,
                                   chunk_frames=chunk_frames, overlap_frames=overlap_frames, causal=causal,
                                   extra_before=extra_before, extra_after=extra_after, scale=scale,
                                   validate=False)
    return as_bnhd(out)


def empty_bnhd(q: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, N, D] tensor like q whose memory is [B, N, H, D]: the layout the model's
    ``transpose(1, 2).reshape(B, N, H*D)`` after attention reads without a copy."""
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)


def as_bnhd(y: torch.Tensor) -> torch.Tensor:
    """``y`` ([B, H, N, D]) in the layout of :func:`empty_bnhd` (a copy only when it is not)."""
    return y if y.transpose(1, 2).is_contiguous() else empty_bnhd(y).copy_(y)


@_hybrid_attention_op.register_fake
def _(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after,
      scale):
    return empty_bnhd(q)


def _setup_context(ctx, inputs, output):
    call = HybridCall.from_args(inputs)
    ctx.save_for_backward(*call.tensors)
    ctx.layout = call.layout


def _backward(ctx, grad):
    tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad[:len(HybridCall.TENSORS)]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs)]
        out = hybrid_attention_chunked(*leaves, **ctx.layout, validate=False)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
    return tuple(next(grads) if n else None for n in needs) + (None,) * len(HybridCall.LAYOUT)


_hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)
# CUDA: the fused Triton kernel where it applies, else this PyTorch form (kernels/__init__.py).
_hybrid_attention_op.register_kernel("cuda")(hybrid_attention_cuda)


# ---------------------------------------------------------------------------------------------
# The step form: one chunk of the recurrent form as one node under torch.compile
# ---------------------------------------------------------------------------------------------

STEP_OP_NAME = "rehyat::hybrid_attention_step"


def _step_outputs(y, state, inputs) -> tuple:
    """(y as [B, N, H, D] memory seen as [B, H, N, D], the six state tensors contiguous, own storage): one layout
    whatever form computed them, so the fake implementation can promise it, and no output sharing
    memory with an input (a custom op's contract: torch.compile checks it)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}

    def own(t):
        if not (t.is_contiguous() and t.storage_offset() == 0) or (t.numel() and t.untyped_storage().data_ptr() in taken):
            t = t.clone(memory_format=torch.contiguous_format)
        return t

    return (as_bnhd(y), *(own(t) for t in state))


@torch.library.custom_op(STEP_OP_NAME, mutates_args=())
def _hybrid_attention_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
                              s: torch.Tensor, z: torch.Tensor, k_overlap: torch.Tensor, v_overlap: torch.Tensor,
                              fk_overlap: torch.Tensor, overlap_valid: torch.Tensor, tokens_per_frame: int,
                              chunk_frames: int, overlap_frames: int, extra_before: int, extra_after: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    state = HybridState(s, z, k_overlap, v_overlap, fk_overlap, overlap_valid)
    y, new = hybrid_attention_step_eager(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                         chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                         extra_before=extra_before, extra_after=extra_after, scale=scale)
    return _step_outputs(y, new, (q, k, v, fq, fk, *state))


def _fake_step_outputs(q, *state) -> tuple:
    """What :func:`_step_outputs` promises, for the step ops' fake implementations."""
    return (empty_bnhd(q), *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in state))


@_hybrid_attention_step_op.register_fake
def _(q, k, v, fq, fk, s, z, k_overlap, v_overlap, fk_overlap, overlap_valid, tokens_per_frame, chunk_frames,
      overlap_frames, extra_before, extra_after, scale):
    return _fake_step_outputs(q, s, z, k_overlap, v_overlap, fk_overlap, overlap_valid)


def hybrid_attention_step_compiled(q, k, v, fq, fk, state, layout: dict):
    """``rc.hybrid_attention_step`` as one ``rehyat::hybrid_attention_step`` node (under torch.compile):
    the fused step at run time on CUDA, the PyTorch step elsewhere. ``layout``: validated keywords."""
    outs = _hybrid_attention_step_op(q, k, v, fq, fk, *state, **layout)
    return outs[0], HybridState(*outs[1:])


STEPS_OP_NAME = "rehyat::hybrid_attention_steps"


@torch.library.custom_op(STEPS_OP_NAME, mutates_args=())
def _hybrid_attention_steps_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
                               s: torch.Tensor, z: torch.Tensor, k_overlap: torch.Tensor, v_overlap: torch.Tensor,
                               fk_overlap: torch.Tensor, overlap_valid: torch.Tensor, tokens_per_frame: int,
                               chunk_frames: int, overlap_frames: int, scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    from .attention import hybrid_attention_steps  # eager here: the chunk-parallel launch on CUDA
    state = HybridState(s, z, k_overlap, v_overlap, fk_overlap, overlap_valid)
    y, new = hybrid_attention_steps(q, k, v, fq, fk, state, tokens_per_frame=tokens_per_frame,
                                    chunk_frames=chunk_frames, overlap_frames=overlap_frames, scale=scale)
    return _step_outputs(y, new, (q, k, v, fq, fk, *state))


@_hybrid_attention_steps_op.register_fake
def _(q, k, v, fq, fk, s, z, k_overlap, v_overlap, fk_overlap, overlap_valid, tokens_per_frame, chunk_frames,
      overlap_frames, scale):
    return _fake_step_outputs(q, s, z, k_overlap, v_overlap, fk_overlap, overlap_valid)


def hybrid_attention_steps_compiled(q, k, v, fq, fk, state, layout: dict):
    """``rc.hybrid_attention_steps`` (several chunks, no extra tokens) as one ``rehyat::hybrid_attention_steps``
    node under torch.compile: the chunk-parallel launch from the carried state at run time on CUDA (not
    one traced step per chunk). ``layout``: validated keywords."""
    outs = _hybrid_attention_steps_op(q, k, v, fq, fk, *state, **layout)
    return outs[0], HybridState(*outs[1:])


# ---------------------------------------------------------------------------------------------
# The op's call, by name: the one place that knows the argument order
# ---------------------------------------------------------------------------------------------

HYBRID_OP = torch.ops.rehyat.hybrid_attention.default


@dataclass(frozen=True)
class HybridCall:
    """The arguments of one ``rehyat::hybrid_attention`` call, by name.

    Tensors ``q, k, v`` ([B, H, N, D]) and ``fq, fk`` ([B, H, N, F]) -- or the ``fx.Node`` s that
    compute them in a graph -- and the layout (docs/hybrid_attention.md): ``extra_after`` may be a
    node when the extra-token count is computed in the graph. Passes, the step program, the cost
    model and distillation read and write the op's arguments only through this view::

        call = HybridCall.from_node(node)           # node.target is HYBRID_OP
        node.args = call.replace(q=new_q).to_args()
    """

    q: Any
    k: Any
    v: Any
    fq: Any
    fk: Any
    tokens_per_frame: int
    chunk_frames: int
    overlap_frames: int
    causal: bool
    extra_before: Any
    extra_after: Any
    scale: float

    TENSORS = ("q", "k", "v", "fq", "fk")
    LAYOUT = ("tokens_per_frame", "chunk_frames", "overlap_frames", "causal", "extra_before", "extra_after",
              "scale")

    @classmethod
    def from_args(cls, args, kwargs=None) -> "HybridCall":
        """Bind positional ``args`` (and ``kwargs``) of the op in its schema's order."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = dict(zip(names, args))
        values.update(kwargs or {})
        missing = [n for n in names if n not in values]
        if len(args) > len(names) or missing:
            raise TypeError(f"{OP_NAME} takes {names}; got {len(args)} positional arguments, missing {missing}")
        return cls(**values)

    @classmethod
    def from_node(cls, node: fx.Node) -> "HybridCall":
        if not is_hybrid_node(node):
            raise TypeError(f"node {node.name} calls {node.target}, not {OP_NAME}")
        return cls.from_args(node.args, node.kwargs)

    def to_args(self) -> tuple:
        """Positional arguments for ``torch.ops.rehyat.hybrid_attention.default``."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def replace(self, **changes) -> "HybridCall":
        return dataclasses.replace(self, **changes)

    @property
    def tensors(self) -> tuple:
        """(q, k, v, fq, fk)."""
        return tuple(getattr(self, n) for n in self.TENSORS)

    @property
    def layout(self) -> dict:
        """The layout and scale as keyword arguments of ``rc.hybrid_attention`` and its forms."""
        return {n: getattr(self, n) for n in self.LAYOUT}

    def map(self, fn) -> "HybridCall":
        """Every argument through ``fn`` (graph copies: old node -> new node)."""
        return HybridCall(*(fn(a) for a in self.to_args()))


def is_hybrid_node(node) -> bool:
    """True for a graph node that calls the hybrid op."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is HYBRID_OP


def _check_view_matches_schema() -> None:
    schema = [a.name for a in HYBRID_OP._schema.arguments]
    view = [f.name for f in dataclasses.fields(HybridCall)]
    if schema != view:  # a new op argument must be added to the view too
        raise RuntimeError(f"HybridCall fields {view} do not match the schema of {OP_NAME}: {schema}")


_check_view_matches_schema()


def hybrid_attention(q, k, v, fq, fk, *, tokens_per_frame, chunk_frames, overlap_frames, causal=True,
                     extra_before=0, extra_after=0, scale=None):
    """ReHyAt hybrid attention (docs/hybrid_attention.md), chunk-parallel. q, k, v: [B,H,N,D]; fq, fk: [B,H,N,F]
    with N = extra_before + frames * tokens_per_frame + extra_after. Returns [B,H,N,D] in q's dtype."""
    layout = make_layout(tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before, extra_after)
    validate_inputs(q, k, v, fq, fk, layout)
    return _hybrid_attention_op(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal,
                                extra_before, extra_after, resolve_scale(scale, q.shape[-1]))


# ---------------------------------------------------------------------------------------------
# FLOP formula: one definition for flop_counter and the cost model
# ---------------------------------------------------------------------------------------------

def _floor_div(a, b):
    return sympy.floor(a / b) if isinstance(a, sympy.Basic) else a // b


def _min(a, b):
    return sympy.Min(a, b) if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic) else min(a, b)


def hybrid_attention_flops(batch, heads, n_tokens, head_dim, feature_dim, *, tokens_per_frame, chunk_frames,
                           overlap_frames, causal=True, extra_before=0, extra_after=0):
    """Matmul FLOPs (a multiply-add is 2) of the hybrid op, counted on the true windows (no padding).

    Softmax: 4*D per (query, key) pair in each video query's window plus extra keys, and for each
    extra query over all N keys. Linear: 2*F*D per video token to build S (twice when non-causal,
    which sums the frames before and after the window separately), 2*F*(D+1) per video token to
    read S and z out. Works on ints or sympy expressions (n_tokens symbolic in frames).
    """
    m, tc, to = tokens_per_frame, chunk_frames, overlap_frames
    extra = extra_before + extra_after
    frames = _floor_div(n_tokens - extra, m)
    full = _floor_div(frames, tc)
    rem = frames - full * tc
    first = _min(tc, frames)
    # sum over chunks of (chunk frames) * (window frames) = sum c_t^2 + To * (frames - c_0)
    pair_frames = full * tc * tc + rem * rem + to * (frames - first)
    video_softmax = 4 * head_dim * (m * m * pair_frames + m * frames * extra)
    extra_softmax = 4 * head_dim * extra * n_tokens
    builds = 1 if causal else 2
    linear = 2 * builds * m * frames * feature_dim * head_dim + 2 * m * frames * feature_dim * (head_dim + 1)
    return batch * heads * (video_softmax + extra_softmax + linear)


@register_flop_formula(torch.ops.rehyat.hybrid_attention)
def _hybrid_attention_flop_formula(q_shape, k_shape, v_shape, fq_shape, fk_shape, tokens_per_frame,
                                   chunk_frames, overlap_frames, causal, extra_before, extra_after, scale,
                                   *args, out_shape=None, **kwargs) -> int:
    bsz, heads, n, d = q_shape
    return hybrid_attention_flops(bsz, heads, n, d, fq_shape[-1], tokens_per_frame=tokens_per_frame,
                                  chunk_frames=chunk_frames, overlap_frames=overlap_frames, causal=causal,
                                  extra_before=extra_before, extra_after=extra_after)


# ---------------------------------------------------------------------------------------------
# Decomposition into standard aten ops
# ---------------------------------------------------------------------------------------------

def decompositions(prefix: str = "cumsum") -> dict:
    """``{op: fn}`` for ``ExportedProgram.run_decompositions``: the custom op becomes the
    chunk-parallel form in aten ops. ``prefix='matmul'`` avoids cumsum (TVM's VM cannot lower it)."""
    if prefix not in ("cumsum", "matmul"):
        raise ValueError(f"prefix must be 'cumsum' or 'matmul', got {prefix!r}")

    def decomposed(q, k, v, fq, fk, tokens_per_frame, chunk_frames, overlap_frames, causal, extra_before,
                   extra_after, scale):
        return hybrid_attention_chunked(q, k, v, fq, fk, tokens_per_frame=tokens_per_frame,
                                        chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                        causal=causal, extra_before=extra_before, extra_after=extra_after,
                                        scale=scale, prefix=prefix, validate=False)

    return {torch.ops.rehyat.hybrid_attention.default: decomposed}
