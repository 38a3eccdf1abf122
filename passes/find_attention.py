"""Find every softmax attention in a canonicalised exported graph.

Accepted spellings (after :mod:`canonicalize`):

* ``aten.scaled_dot_product_attention`` and its fused variants
  (``_scaled_dot_product_flash_attention_for_cpu``, ``_scaled_dot_product_flash_attention``,
  ``_scaled_dot_product_efficient_attention``, ``_scaled_dot_product_cudnn_attention``; output 0);
* the manual core pattern, anchored at the softmax and walked outward::

      scores = matmul(q * c_q, kT * c_k)      # kT: transpose(k) or any [.., D, Nk] tensor
      scores = scores * c                     # optional, c a python number (div is folded to mul)
      scores = scores + mask | masked_fill(scores, m, -inf) | where(m, scores, -inf)   # optional
      p = softmax(cast(scores), -1)           # _softmax, softmax.int, _safe_softmax; casts optional
      out = matmul(cast(p), v)

Every softmax is reported: a softmax that does not fit (over a non-key axis, output reused
elsewhere, scores not a matmul, ...) becomes a :class:`AttentionMatch` with a ``reason``, never a
silent near miss. ``flex_attention`` is reported as declined with its reason.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .canonicalize import CASTS

aten = torch.ops.aten

SDPA = {aten.scaled_dot_product_attention.default: "sdpa"}
FUSED_SDPA = {
    getattr(aten, name).default: form
    for name, form in (("_scaled_dot_product_flash_attention_for_cpu", "sdpa-flash-cpu"),
                       ("_scaled_dot_product_flash_attention", "sdpa-flash"),
                       ("_scaled_dot_product_efficient_attention", "sdpa-efficient"),
                       ("_scaled_dot_product_cudnn_attention", "sdpa-cudnn"))
    if hasattr(aten, name)
}
SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, operator.mul}
TRANSPOSE_OPS = {aten.transpose.int, aten.permute.default, aten.t.default}


@dataclass
class AttentionMatch:
    """One attention found in the graph (or a declined near miss, when ``reason`` is set).

    ``output``: node whose value the attention result is (replaced by the rewrite); ``q``: [.., Nq, D];
    ``k``: [.., Nk, D] or None when only ``k_t`` ([.., D, Nk]) exists; ``v``: [.., Nk, Dv];
    ``scale``: multiplier of q.k (None: the SDPA default 1/sqrt(D)); ``mask``/``mask_kind``:
    "additive" (added to the scores), "keep" (bool, True = attend), "drop" (bool, True = masked).
    """

    anchor: fx.Node
    form: str
    output: fx.Node | None = None
    q: fx.Node | None = None
    k: fx.Node | None = None
    k_t: fx.Node | None = None
    v: fx.Node | None = None
    scale: float | None = None
    mask: fx.Node | None = None
    mask_kind: str | None = None
    is_causal: bool = False
    gqa: bool = False
    interior: list = field(default_factory=list)
    reason: str = ""

    @property
    def found(self) -> bool:
        return not self.reason


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _rank(node) -> int | None:
    val = _val(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _skip_casts_up(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    return node


def _peel_scale(node, scale: float) -> tuple:
    """Strip ``x * c`` / ``c * x`` (c a python number) and casts above ``node``; fold c into scale."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in SCALE_OPS and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and _is_number(b):
                node, scale = a, scale * b
                continue
            if isinstance(b, fx.Node) and _is_number(a):
                node, scale = b, scale * a
                continue
        if node.target in CASTS:
            node = node.args[0]
            continue
        break
    return node, scale


def _swaps_last_two(node: fx.Node) -> bool:
    """True if ``node`` transposes the last two dims of its input (and nothing else)."""
    rank = _rank(node.args[0]) if node.args else None
    if rank is None or rank < 2:
        return False
    if node.target == aten.t.default:
        return rank == 2
    if node.target == aten.transpose.int:
        dims = sorted(d % rank for d in node.args[1:3])
        return dims == [rank - 2, rank - 1]
    if node.target == aten.permute.default:
        perm = [d % rank for d in node.args[1]]
        return perm == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _match_sdpa(node: fx.Node, form: str) -> AttentionMatch:
    q, k, v = node.args[:3]
    fused = form != "sdpa"
    if fused:
        output = next((u for u in node.users if u.target == operator.getitem and u.args[1] == 0), None)
        mask = node.kwargs.get("attn_mask")
        if form == "sdpa-efficient":
            mask = _arg(node, 3, "attn_bias")
        dropout = _arg(node, 3 if form != "sdpa-efficient" else 5, "dropout_p", 0.0)
        causal = _arg(node, 4 if form != "sdpa-efficient" else 6, "is_causal", False)
        gqa = False
    else:
        output = node
        mask = _arg(node, 3, "attn_mask")
        dropout = _arg(node, 4, "dropout_p", 0.0)
        causal = _arg(node, 5, "is_causal", False)
        gqa = bool(node.kwargs.get("enable_gqa", False))
    scale = node.kwargs.get("scale", _arg(node, 6, "scale") if not fused else None)
    match = AttentionMatch(node, form, output, q, k, None, v, scale, mask, None, bool(causal), gqa, [node])
    if output is None:
        match.reason = "fused attention output 0 is never read"
    elif dropout:
        match.reason = f"attention dropout p={dropout} (only p=0 / eval can be converted)"
    if mask is not None:
        mask_val = _val(mask)
        match.mask_kind = "keep" if isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool else "additive"
    return match


def _match_manual(softmax: fx.Node) -> AttentionMatch:
    """Walk out from a softmax; fill ``reason`` at the first part that does not fit."""
    match = AttentionMatch(softmax, "matmul-softmax", interior=[softmax])
    rank = _rank(softmax)
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if rank is None or dim is None or dim % rank != rank - 1:
        match.reason = f"softmax over dim {dim} of a rank-{rank} tensor, not the key (last) axis"
        return match
    # downward: p -> (casts) -> matmul(p, v), p used nowhere else
    user, node = None, softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            match.reason = f"softmax output is used by {len(users)} nodes (reused elsewhere), not only by p @ v"
            return match
        user = users[0]
        if user.op == "call_function" and (user.target in CASTS or user.target == aten.dropout.default):
            if user.target == aten.dropout.default:
                p = _arg(user, 1, "p", 0.5)
                train = _arg(user, 2, "train", True)
                if p and train:
                    match.reason = f"attention dropout p={p} in training mode"
                    return match
            match.interior.append(user)
            node = user
            continue
        break
    if user.op != "call_function" or user.target != aten.matmul.default or user.args[0] is not node:
        match.reason = f"softmax output feeds {getattr(user.target, '__name__', user.target)}, not p @ v"
        return match
    match.output, match.v = user, user.args[1]
    match.interior.append(user)
    # upward: scores -> (casts) -> (mask) -> (scale) -> matmul(q, kT)
    node, scale = _peel_scale(_skip_casts_up(softmax.args[0]), 1.0)
    if node.op == "call_function" and node.target in (aten.add.Tensor, operator.add) and len(node.args) == 2:
        a, b = node.args
        a_root, b_root = _peel_scale(a, 1.0)[0], _peel_scale(b, 1.0)[0]
        if isinstance(a_root, fx.Node) and a_root.target == aten.matmul.default:
            node, match.mask = a, b
        elif isinstance(b_root, fx.Node) and b_root.target == aten.matmul.default:
            node, match.mask = b, a
        match.mask_kind = "additive" if match.mask is not None else None
    elif node.op == "call_function" and node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        fill = node.args[2]
        if _is_number(fill) and fill < -1e4:
            node, match.mask, match.mask_kind = node.args[0], node.args[1], "drop"
    elif node.op == "call_function" and node.target in (aten.where.self, aten.where.ScalarOther):
        cond, x, other = node.args
        if _is_number(other) and other < -1e4 or (isinstance(other, fx.Node) and _is_large_negative(other)):
            node, match.mask, match.mask_kind = x, cond, "keep"
    if match.mask is not None:
        node, scale = _peel_scale(node, scale)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.matmul.default):
        target = getattr(node, "target", node)
        match.reason = f"softmax input is {getattr(target, '__name__', target)}, not a matmul of q and k"
        return match
    match.interior.append(node)
    match.form = f"{node.meta.get('rehyat_spelling', 'matmul')}-softmax"
    q, scale = _peel_scale(node.args[0], scale)
    k_t, scale = _peel_scale(node.args[1], scale)
    if isinstance(k_t, fx.Node) and k_t.op == "call_function" and k_t.target in TRANSPOSE_OPS and _swaps_last_two(k_t):
        k, scale = _peel_scale(k_t.args[0], scale)
        match.k = k
    match.q, match.k_t, match.scale = q, k_t, scale
    q_val, v_val, out_val = _val(q), _val(match.v), _val(match.output)
    if not all(isinstance(t, torch.Tensor) for t in (q_val, v_val, out_val)):
        match.reason = "q, v or output has no tensor metadata"
    elif q_val.dim() not in (3, 4):
        match.reason = f"q has rank {q_val.dim()}; only [B, H, N, D] or [B*H, N, D] are converted"
    elif q_val.dim() != v_val.dim() or q_val.shape[:-2] != v_val.shape[:-2]:
        match.reason = f"q {tuple(q_val.shape)} and v {tuple(v_val.shape)} do not share batch/head dims"
    return match


def _is_large_negative(node: fx.Node) -> bool:
    """A scalar tensor constant holding -inf or a very negative number (``torch.tensor(-inf)``),
    through export's lift_fresh_copy / detach wrappers."""
    while node.op == "call_function" and node.target in (aten.lift_fresh_copy.default, aten.detach_.default,
                                                          aten.detach.default, aten.clone.default):
        node = node.args[0]
    if node.op == "call_function" and node.target in (aten.full.default, aten.scalar_tensor.default):
        value = node.args[1] if node.target == aten.full.default else node.args[0]
        return _is_number(value) and value < -1e4
    if node.op == "get_attr":
        try:
            value = node.graph.owning_module
            for part in node.target.split("."):
                value = getattr(value, part)
        except AttributeError:
            return False
        return isinstance(value, torch.Tensor) and value.numel() == 1 and value.item() < -1e4
    return False


def _match_flex(node: fx.Node) -> AttentionMatch:
    return AttentionMatch(node, "flex_attention", reason="flex_attention: its score_mod / block_mask cannot be "
                          "expressed in the hybrid op")


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Every SDPA node, every softmax (matched or with a decline reason) and every flex_attention."""
    matches = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA:
            matches.append(_match_sdpa(node, SDPA[node.target]))
        elif node.target in FUSED_SDPA:
            matches.append(_match_sdpa(node, FUSED_SDPA[node.target]))
        elif node.target in SOFTMAX:
            matches.append(_match_manual(node))
        elif "flex_attention" in str(node.target):
            matches.append(_match_flex(node))
    for match in matches:
        if match.found and match.scale is None:
            match.scale = 1.0 / math.sqrt(_val(match.q).shape[-1])
    return matches
