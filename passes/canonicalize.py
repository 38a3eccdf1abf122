"""Normalise an exported graph so one attention pattern covers the common spellings.

Rewrites (each exact, numerically a no-op or an identity of the op):

* ``aten.view`` -> ``aten.reshape`` (one name for "reshape");
* ``aten.bmm`` -> ``aten.matmul`` (same result on 3-D operands);
* ``aten.baddbmm(bias, a, b, beta, alpha)`` -> ``matmul(a, b) * alpha + bias * beta``, so its
  scale and additive mask look like every other score;
* two-operand ``aten.einsum`` with one contracted index -> ``permute``, ``matmul``, ``permute``;
* ``x / c`` (c a python number) -> ``x * (1/c)``;
* ``_assert_tensor_metadata`` (export's dtype checks beside casts) are dropped;
* no-op casts (``to`` / ``_to_copy`` / ``type_as`` to the same dtype), ``contiguous`` of a value that
  is already contiguous, and ``dropout`` with p = 0 or train = False are dropped. A ``contiguous`` that
  changes the layout stays: it is the model's own layout decision (diffusers' Wan makes the patch
  embedding's transposed output contiguous before its blocks; without it every norm, residual add and
  modulation of every block reads strided memory). Matchers look through it (:data:`SAME_VALUE`).

Node ``meta`` (``val``, ``nn_module_stack``, ``stack_trace``) is copied to every new node; a matmul that was
spelled otherwise records it in ``meta["rehyat_spelling"]`` (``bmm``, ``baddbmm``, ``einsum``).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout}
# Ops that change neither a value nor its dtype beyond a cast: pattern matchers walk through them.
SAME_VALUE = CASTS | {aten.contiguous.default}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _copy_meta(new: fx.Node, old: fx.Node, val=None) -> fx.Node:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "torch_fn"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    new.meta["val"] = val if val is not None else old.meta.get("val")
    return new


def _surely_contiguous(t: torch.Tensor) -> bool:
    """True when ``t``'s strides are row-major for every value its symbolic sizes may take."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return guard_or_false(t.is_contiguous())


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = _val(node.args[0]), _val(node)
    same = isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype
    if node.target in CASTS:
        return same and src.device == out.device and not node.kwargs.get("memory_format")
    if node.target == aten.contiguous.default:
        return same and _surely_contiguous(src)
    if node.target == aten.dropout.default:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return p == 0 or train is False
    return False


def _parse_einsum(equation: str):
    """(a, b, out) index strings of a two-operand einsum with one contracted index, or None."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    ins, out = equation.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    contracted = [c for c in a if c in b and c not in out]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    batch = [c for c in a if c in b and c in out]
    if (len(contracted) != 1 or len(free_a) != 1 or len(free_b) != 1 or set(out) != set(batch + free_a + free_b)
            or len(set(a)) != len(a) or len(set(b)) != len(b)):
        return None
    return a, b, out, batch, free_a[0], free_b[0], contracted[0]


def _permute(graph: fx.Graph, x: fx.Node, perm: list, like: fx.Node) -> fx.Node:
    """``x.permute(perm)``, or ``x`` itself for the identity permutation."""
    if perm == sorted(perm):
        return x
    val = _val(x).permute(perm) if _val(x) is not None else None
    return _copy_meta(graph.call_function(aten.permute.default, (x, perm)), like, val)


def _rewrite_einsum(graph: fx.Graph, node: fx.Node) -> bool:
    equation, operands = node.args[0], node.args[1]
    parsed = _parse_einsum(equation) if isinstance(equation, str) and len(operands) == 2 else None
    if parsed is None:
        return False
    a_idx, b_idx, out_idx, batch, fa, fb, c = parsed
    a, b = operands
    with graph.inserting_before(node):
        pa = _permute(graph, a, [a_idx.index(x) for x in batch + [fa, c]], node)
        pb = _permute(graph, b, [b_idx.index(x) for x in batch + [c, fb]], node)
        mm_val = torch.matmul(_val(pa), _val(pb)) if _val(pa) is not None and _val(pb) is not None else None
        mm = _copy_meta(graph.call_function(aten.matmul.default, (pa, pb)), node, mm_val)
        mm.meta["rehyat_spelling"] = "einsum"
        order = batch + [fa, fb]
        out = _permute(graph, mm, [order.index(x) for x in out_idx], node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _rewrite_baddbmm(graph: fx.Graph, node: fx.Node) -> None:
    bias, a, b = node.args[:3]
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    with graph.inserting_before(node):
        mm = _copy_meta(graph.call_function(aten.matmul.default, (a, b)), node)
        mm.meta["rehyat_spelling"] = "baddbmm"
        out = mm if alpha == 1 else _copy_meta(graph.call_function(aten.mul.Tensor, (mm, alpha)), node)
        if beta != 0:
            scaled_bias = bias if beta == 1 else _copy_meta(graph.call_function(aten.mul.Tensor, (bias, beta)), node,
                                                           _val(bias))
            out = _copy_meta(graph.call_function(aten.add.Tensor, (out, scaled_bias)), node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Apply the rewrites listed in the module docstring in place; returns ``gm`` (recompiled)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten._assert_tensor_metadata.default:
            graph.erase_node(node)  # dtype asserts export adds beside casts; they read tensors and block matching
        elif node.target == aten.view.default:
            node.target = aten.reshape.default
        elif node.target == aten.bmm.default:
            node.target = aten.matmul.default
            node.meta["rehyat_spelling"] = "bmm"
        elif node.target == aten.baddbmm.default:
            _rewrite_baddbmm(graph, node)
        elif node.target == aten.einsum.default:
            _rewrite_einsum(graph, node)
        elif node.target in (aten.div.Tensor, aten.div.Scalar, operator.truediv) and len(node.args) == 2 \
                and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool) \
                and node.args[1] != 0 and not node.kwargs and isinstance(node.args[0], fx.Node) \
                and isinstance(_val(node.args[0]), torch.Tensor):
            node.target, node.args = aten.mul.Tensor, (node.args[0], 1.0 / node.args[1])
        elif _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
