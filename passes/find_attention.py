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
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from ..attention_spellings import SdpaCall, bound_arguments, spelling_of
from ..declines import Decline
from ..site import Site, site_key
from .canonicalize import SAME_VALUE

aten = torch.ops.aten

SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, operator.mul}
TRANSPOSE_OPS = {aten.transpose.int, aten.permute.default, aten.t.default}


@dataclass
class AttentionMatch:
    """One attention found in the graph (or a declined near miss, when ``reason`` is set).

    ``output``: node whose value the attention result is (replaced by the rewrite); ``q``: [.., Nq, D];
    ``k``: [.., Nk, D] or None when only ``k_t`` ([.., D, Nk]) exists; ``v``: [.., Nk, Dv];
    ``scale``: multiplier of q.k (None: the SDPA default 1/sqrt(D)); ``mask``/``mask_kind``:
    "additive" (added to the scores), "keep" (bool, True = attend), "drop" (bool, True = masked);
    ``decline``: why this is not a convertible attention (None when it is).
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
    decline: Decline | None = None

    @property
    def found(self) -> bool:
        return self.decline is None

    def declined(self, code: str, detail: str) -> "AttentionMatch":
        self.decline = Decline(code, detail)
        return self


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
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in SAME_VALUE:
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
        if node.target in SAME_VALUE:
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
    call = SdpaCall.from_node(node)
    match = AttentionMatch(node, form, call.output, call.q, call.k, None, call.v, call.scale, call.mask, None,
                           call.is_causal, call.enable_gqa, [node])
    if call.output is None:
        match.declined("not-attention", "fused attention output 0 is never read")
    elif call.dropout_p:
        match.declined("attention-dropout", f"attention dropout p={call.dropout_p} (only p=0 / eval can be converted)")
    if call.mask is not None:
        mask_val = _val(call.mask)
        match.mask_kind = "keep" if isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.bool else "additive"
    return match


def _match_manual(softmax: fx.Node) -> AttentionMatch:
    """Walk out from a softmax; fill ``reason`` at the first part that does not fit."""
    match = AttentionMatch(softmax, "matmul-softmax", interior=[softmax])
    rank = _rank(softmax)
    dim = bound_arguments(softmax).get("dim")
    if rank is None or dim is None or dim % rank != rank - 1:
        return match.declined("not-attention", f"softmax over dim {dim} of a rank-{rank} tensor, not the key (last) axis")
    # downward: p -> (casts) -> matmul(p, v), p used nowhere else
    user, node = None, softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            return match.declined("not-attention", f"softmax output is used by {len(users)} nodes (reused elsewhere), "
                                  "not only by p @ v")
        user = users[0]
        if user.op == "call_function" and (user.target in SAME_VALUE or user.target == aten.dropout.default):
            if user.target == aten.dropout.default:
                p = _arg(user, 1, "p", 0.5)
                train = _arg(user, 2, "train", True)
                if p and train:
                    return match.declined("attention-dropout", f"attention dropout p={p} in training mode")
            match.interior.append(user)
            node = user
            continue
        break
    if user.op != "call_function" or user.target != aten.matmul.default or user.args[0] is not node:
        return match.declined("not-attention",
                              f"softmax output feeds {getattr(user.target, '__name__', user.target)}, not p @ v")
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
        return match.declined("not-attention",
                              f"softmax input is {getattr(target, '__name__', target)}, not a matmul of q and k")
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
        match.declined("unsupported-rank", "q, v or output has no tensor metadata")
    elif q_val.dim() not in (3, 4):
        match.declined("unsupported-rank", f"q has rank {q_val.dim()}; only [B, H, N, D] or [B*H, N, D] are converted")
    elif q_val.dim() != v_val.dim() or q_val.shape[:-2] != v_val.shape[:-2]:
        match.declined("unsupported-rank", f"q {tuple(q_val.shape)} and v {tuple(v_val.shape)} do not share batch/head dims")
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
    return AttentionMatch(node, "flex_attention").declined(
        "flex-attention", "flex_attention: its score_mod / block_mask cannot be expressed in the hybrid op")


def find_attention(gm: fx.GraphModule) -> list[AttentionMatch]:
    """Every SDPA node, every softmax (matched or with a decline reason) and every flex_attention,
    as the spelling table (:mod:`rehyat_compile.attention_spellings`) names them. Graph order."""
    matches = []
    for node in gm.graph.nodes:
        spelling = spelling_of(node)
        if spelling is None or spelling.family == "hybrid":
            continue
        if spelling.family in ("sdpa", "fused-sdpa"):
            matches.append(_match_sdpa(node, spelling.form))
        elif spelling.family == "softmax":
            matches.append(_match_manual(node))
        else:
            matches.append(_match_flex(node))
    for match in matches:
        if match.found and match.scale is None:
            match.scale = 1.0 / math.sqrt(_val(match.q).shape[-1])
    return matches


# ---------------------------------------------------------------------------------------------
# The pipeline's "find" pass: one Site per match (and per linear-attention module)
# ---------------------------------------------------------------------------------------------

def _int_or_none(x):
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if expr.is_Integer else None
    return int(x)


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that produced ``node`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export names nested modules like "L['self'].blocks[0]" in some modes; keep the plain dotted path
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "")


def site_of_match(match: AttentionMatch, name: str) -> Site:
    """The site a match is: its module, form, heads and head dims from q/k's ``meta["val"]``."""
    site = Site(name, module_path(match.anchor), "self", match.form, key=site_key(name), match=match,
                decline=match.decline, scale=match.scale)
    q = match.q.meta.get("val") if match.q is not None else None
    if not isinstance(q, torch.Tensor):
        return site
    k = match.k if match.k is not None else match.k_t
    kval = k.meta.get("val") if k is not None else None
    return replace(site, head_dim=_int_or_none(q.shape[-1]), heads=_int_or_none(q.shape[1]) if q.dim() == 4 else None,
                   kv_heads=_int_or_none(kval.shape[1]) if isinstance(kval, torch.Tensor) and kval.dim() == 4 else None)


def linear_attention_sites(model: torch.nn.Module | None, gm: fx.GraphModule, taken: set) -> list[Site]:
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
                              key=site_key(name), decline=Decline("linear-attention", f"linear attention ({kind}): "
                              "no softmax to convert, already linear in the number of tokens")))
    return sites


def find_sites(gm: fx.GraphModule, model: torch.nn.Module | None = None) -> list[Site]:
    """Every attention of ``gm`` as a Site named after its module ("<module>:<i>" for the i-th
    after the first in one module), then the linear-attention modules of ``model``. Graph order."""
    counts: dict[str, int] = {}
    sites = []
    for match in find_attention(gm):
        module = module_path(match.anchor)
        index = counts.get(module, 0)
        counts[module] = index + 1
        name = module if index == 0 else f"{module}:{index}"
        sites.append(site_of_match(match, name or "<root>"))
    return sites + linear_attention_sites(model, gm, {s.module for s in sites})
