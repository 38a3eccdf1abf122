"""passes/canonicalize.py: each normalisation turns the spelling it names into the canonical one
(Before/Expected op targets and counts), keeps node meta (``val`` shapes, ``nn_module_stack``,
``rehyat_spelling``) and the function's values; what it must not touch stays as it was."""
import math
import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import fx, nn

from rehyat_compile.passes.canonicalize import canonicalize
from rehyat_compile.passes.find_attention import find_attention

aten = torch.ops.aten


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def exported(fn, *args) -> fx.GraphModule:
    """``fn(*args)`` exported (static shapes, training IR) as the GraphModule the passes take."""
    return torch.export.export(Fn(fn), args, strict=False).module()


def targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def runtime_values(gm, *args) -> dict:
    """{node: value} of one real run of ``gm``."""
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Record(gm).run(*args)
    return values


def assert_meta_val_matches_runtime(gm, *args):
    """Every tensor-valued node's meta["val"] has the shape and dtype the node really computes."""
    for node, value in runtime_values(gm, *args).items():
        if node.op == "call_function" and isinstance(value, torch.Tensor):
            val = node.meta.get("val")
            assert isinstance(val, torch.Tensor), f"{node.name} ({node.target}) lost meta['val']"
            assert tuple(val.shape) == tuple(value.shape) and val.dtype == value.dtype, node.name


def canonicalized(fn, *args, rtol=1e-6, atol=1e-6):
    """(before targets, after targets, gm): exported, canonicalised, values and meta checked."""
    gm = exported(fn, *args)
    before_targets = targets(gm)
    with torch.no_grad():
        before = gm(*args)
    assert canonicalize(gm) is gm
    with torch.no_grad():
        after = gm(*args)
    for a, b in zip(torch.utils._pytree.tree_leaves(after), torch.utils._pytree.tree_leaves(before)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert_meta_val_matches_runtime(gm, *args)
    return before_targets, targets(gm), gm


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


X = torch.randn(2, 3, 4, generator=gen(0))
Y = torch.randn(2, 4, 5, generator=gen(1))


# ---------------------------------------------------------------------------------------------
# view -> reshape
# ---------------------------------------------------------------------------------------------

def test_view_becomes_reshape_on_the_same_node_with_its_meta():
    gm = exported(lambda x: x.view(2, 12) * 2, X)
    view = next(n for n in gm.graph.nodes if n.target == aten.view.default)
    val, stack = view.meta["val"], view.meta.get("nn_module_stack")
    before, after, _ = canonicalized(lambda x: x.view(2, 12) * 2, X)
    assert before[aten.view.default] == 1 and aten.reshape.default not in before
    assert aten.view.default not in after and after[aten.reshape.default] == 1
    canonicalize(gm)
    node = next(n for n in gm.graph.nodes if n.name == view.name)
    assert node.target == aten.reshape.default and node.args == (node.args[0], [2, 12])
    assert node.meta["val"] is val and node.meta.get("nn_module_stack") == stack


# ---------------------------------------------------------------------------------------------
# bmm -> matmul, baddbmm -> matmul * alpha + bias * beta
# ---------------------------------------------------------------------------------------------

def test_bmm_becomes_matmul_marked_as_bmm():
    before, after, gm = canonicalized(lambda x, y: torch.bmm(x, y), X, Y)
    assert before == Counter({aten.bmm.default: 1})
    assert after == Counter({aten.matmul.default: 1})
    mm = next(iter(gm.graph.find_nodes(op="call_function", target=aten.matmul.default)))
    assert mm.meta["rehyat_spelling"] == "bmm" and tuple(mm.meta["val"].shape) == (2, 3, 5)


@pytest.mark.parametrize("beta, alpha, muls, adds", [
    (1.0, 1.0, 0, 1),    # plain matmul + bias
    (1.0, 0.5, 1, 1),    # the scale: one mul on the scores
    (2.0, 0.5, 2, 1),    # beta != 1: the bias is scaled too
    (0.0, 0.5, 1, 0),    # beta = 0: the bias is not read at all (even if it holds NaN)
])
def test_baddbmm_becomes_matmul_times_alpha_plus_bias_times_beta(beta, alpha, muls, adds):
    bias = torch.randn(2, 1, 5, generator=gen(2))
    if beta == 0:
        bias = torch.full((2, 1, 5), float("nan"))

    def fn(x, y, b):
        return torch.baddbmm(b, x, y, beta=beta, alpha=alpha)

    before, after, gm = canonicalized(fn, X, Y, bias)
    assert before == Counter({aten.baddbmm.default: 1})
    assert after == Counter({aten.matmul.default: 1, **({aten.mul.Tensor: muls} if muls else {}),
                             **({aten.add.Tensor: adds} if adds else {})})
    mm = next(iter(gm.graph.find_nodes(op="call_function", target=aten.matmul.default)))
    assert mm.meta["rehyat_spelling"] == "baddbmm"
    scale_muls = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor and n.args[0] is mm]
    assert [n.args[1] for n in scale_muls] == ([alpha] if alpha != 1 else [])
    expected = torch.baddbmm(bias, X, Y, beta=beta, alpha=alpha)
    torch.testing.assert_close(gm(X, Y, bias), expected)


def test_baddbmm_scores_are_then_found_as_one_attention_with_its_scale():
    q, k, v = (torch.randn(4, 6, 8, generator=gen(i)) for i in range(3))

    def fn(q, k, v):
        scores = torch.baddbmm(torch.zeros(4, 1, 6), q, k.transpose(1, 2), beta=1.0, alpha=0.25)
        return torch.bmm(scores.softmax(-1), v)

    _, after, gm = canonicalized(fn, q, k, v)
    assert aten.baddbmm.default not in after and aten.bmm.default not in after
    [match] = find_attention(gm)
    assert match.found and match.form == "baddbmm-softmax" and math.isclose(match.scale, 0.25)


# ---------------------------------------------------------------------------------------------
# einsum -> permute, matmul, permute
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("equation, permutes", [
    ("bij,bjk->bik", 0),          # already a matmul
    ("bhnd,bhmd->bhnm", 1),       # q @ k^T: k is transposed
    ("bnhd,bmhd->bhnm", 2),       # [B, N, H, D] producers: both operands permuted, output as is
    ("b i j , b j k -> b k i", 1),  # spaces, and an output permutation
])
def test_einsum_with_one_contracted_index_becomes_matmul(equation, permutes):
    shapes = {"bij,bjk->bik": ((2, 3, 4), (2, 4, 5)), "bhnd,bhmd->bhnm": ((2, 2, 3, 4), (2, 2, 5, 4)),
              "bnhd,bmhd->bhnm": ((2, 3, 2, 4), (2, 5, 2, 4)), "b i j , b j k -> b k i": ((2, 3, 4), (2, 4, 5))}
    a, b = (torch.randn(s, generator=gen(i)) for i, s in enumerate(shapes[equation]))
    gm = exported(lambda a, b: torch.einsum(equation, a, b), a, b)
    einsum = next(iter(gm.graph.find_nodes(op="call_function", target=aten.einsum.default)))
    stack = einsum.meta.get("nn_module_stack")
    before, after, gm = canonicalized(lambda a, b: torch.einsum(equation, a, b), a, b)
    assert before == Counter({aten.einsum.default: 1})
    assert after == Counter({aten.matmul.default: 1, **({aten.permute.default: permutes} if permutes else {})})
    mm = next(iter(gm.graph.find_nodes(op="call_function", target=aten.matmul.default)))
    assert mm.meta["rehyat_spelling"] == "einsum"
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert node.meta.get("nn_module_stack") == stack, node.name
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0][0]
    assert tuple(out.meta["val"].shape) == tuple(torch.einsum(equation, a, b).shape)


@st.composite
def einsum_cases(draw):
    letters = draw(st.permutations("abcdefgh"))
    n_batch = draw(st.integers(0, 2))
    batch, (fa, fb, c) = list(letters[:n_batch]), letters[n_batch:n_batch + 3]
    a_idx = draw(st.permutations(batch + [fa, c]))
    b_idx = draw(st.permutations(batch + [c, fb]))
    out = draw(st.permutations(batch + [fa, fb]))
    sizes = {x: draw(st.integers(2, 3)) for x in batch + [fa, fb, c]}
    return f"{''.join(a_idx)},{''.join(b_idx)}->{''.join(out)}", [sizes[x] for x in a_idx], [sizes[x] for x in b_idx]


@settings(max_examples=15, deadline=None)
@given(einsum_cases())
def test_any_two_operand_einsum_with_one_contraction_becomes_one_exact_matmul(case):
    equation, a_shape, b_shape = case
    a, b = torch.randn(a_shape, generator=gen(3)), torch.randn(b_shape, generator=gen(4))
    _, after, gm = canonicalized(lambda a, b: torch.einsum(equation, a, b), a, b, rtol=1e-5, atol=1e-5)
    assert aten.einsum.default not in after and after[aten.matmul.default] == 1
    assert set(after) <= {aten.matmul.default, aten.permute.default}


@pytest.mark.parametrize("equation, shapes", [
    ("bij,bjk", ((2, 3, 4), (2, 4, 5))),                  # implicit output
    ("bij,bij->b", ((2, 3, 4), (2, 3, 4))),               # two contracted indices
    ("ij,jk->ijk", ((3, 4), (4, 5))),                     # nothing contracted
    ("...ij,...jk->...ik", ((2, 3, 4), (2, 4, 5))),       # ellipsis
    ("ij,jk,kl->il", ((3, 4), (4, 5), (5, 2))),           # three operands
    ("iij,jk->ik", ((3, 3, 4), (4, 5))),                  # repeated index (a diagonal)
])
def test_einsum_outside_the_matmul_form_is_left_unchanged(equation, shapes):
    operands = [torch.randn(s, generator=gen(i)) for i, s in enumerate(shapes)]
    before, after, _ = canonicalized(lambda *ops: torch.einsum(equation, *ops), *operands, rtol=1e-5, atol=1e-5)
    assert before == after == Counter({aten.einsum.default: 1})


# ---------------------------------------------------------------------------------------------
# x / c -> x * (1/c)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [4, 2.5, -8.0])
def test_division_by_a_python_number_becomes_multiplication_by_its_inverse(divisor):
    before, after, gm = canonicalized(lambda x: x / divisor, X)
    assert before == Counter({aten.div.Tensor: 1}) and after == Counter({aten.mul.Tensor: 1})
    mul = next(iter(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)))
    assert mul.args[1] == 1.0 / divisor and not mul.kwargs


@pytest.mark.parametrize("fn, target", [
    (lambda x, y: x / y, aten.div.Tensor),                               # by a tensor
    (lambda x, y: torch.div(x, 4, rounding_mode="floor"), aten.div.Tensor_mode),  # rounding division
    (lambda x, y: x // 4, aten.floor_divide.default),
])
def test_division_that_is_not_by_a_plain_number_is_left_unchanged(fn, target):
    before, after, _ = canonicalized(fn, X, X.abs() + 1)
    assert before == after and after[target] == 1


def _graph_with(target, *extra_args, **kwargs):
    """A hand-written graph ``out = target(x, *extra_args, **kwargs)`` whose x has meta["val"]."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3)
    node = graph.call_function(target, (x, *extra_args), kwargs)
    node.meta["val"] = torch.empty(2, 3)
    graph.output(node)
    return fx.GraphModule(nn.Module(), graph), node


@pytest.mark.parametrize("divisor", [0, 0.0, True])
def test_division_by_zero_or_a_bool_is_left_unchanged(divisor):
    gm, node = _graph_with(aten.div.Tensor, divisor)
    canonicalize(gm)
    assert node.target == aten.div.Tensor and node.args[1] is divisor
    torch.testing.assert_close(gm(torch.ones(2, 3)), torch.ones(2, 3) / divisor)


def test_python_truediv_of_a_tensor_becomes_aten_mul():
    gm, node = _graph_with(operator.truediv, 8)
    canonicalize(gm)
    assert node.target == aten.mul.Tensor and node.args[1] == 0.125
    torch.testing.assert_close(gm(torch.full((2, 3), 4.0)), torch.full((2, 3), 0.5))


def test_division_of_a_value_without_tensor_meta_is_left_unchanged():
    gm, node = _graph_with(operator.truediv, 8)
    del node.args[0].meta["val"]
    canonicalize(gm)
    assert node.target is operator.truediv


# ---------------------------------------------------------------------------------------------
# export's dtype asserts, no-op casts, contiguous, inactive dropout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fn, dropped", [
    ("to same dtype", lambda x, y: x.to(torch.float32) * 2, {aten.to.dtype, aten._assert_tensor_metadata.default}),
    ("float()", lambda x, y: x.float() * 2, {aten.to.dtype, aten._assert_tensor_metadata.default}),
    ("type_as same dtype", lambda x, y: x.type_as(y) * 2, {aten.type_as.default}),
    ("dropout in eval", lambda x, y: F.dropout(x, 0.3, training=False) * 2, {aten.dropout.default}),
    ("dropout p=0", lambda x, y: F.dropout(x, 0.0, training=True) * 2, {aten.dropout.default}),
])
def test_no_op_casts_contiguous_and_inactive_dropout_are_dropped(name, fn, dropped):
    before, after, gm = canonicalized(fn, X, Y)
    assert dropped <= set(before), name
    assert not dropped & set(after), name
    assert after[aten.mul.Tensor] == 1
    mul = next(iter(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)))
    assert mul.args[0].op in ("placeholder", "call_function") and mul.args[0].target != aten.dropout.default


@pytest.mark.parametrize("name, fn, kept", [
    ("to another dtype", lambda x: x.double() * 2, aten.to.dtype),
    ("to channels_last", lambda x: x.reshape(1, 2, 3, 4).to(memory_format=torch.channels_last) * 2,
     aten.to.dtype_layout),
])
def test_casts_that_change_dtype_or_memory_format_are_kept_but_their_asserts_go(name, fn, kept):
    before, after, _ = canonicalized(fn, X)
    assert before[aten._assert_tensor_metadata.default] == 1 and before[kept] == 1, name
    assert aten._assert_tensor_metadata.default not in after and after[kept] == 1, name


def test_a_contiguous_of_a_contiguous_value_is_dropped():
    """export itself elides most of these; one that reaches the graph (hand-inserted here) goes."""
    gm = exported(lambda x: x * 2, X)
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    mul = next(iter(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)))
    with gm.graph.inserting_before(mul):
        copy = gm.graph.call_function(aten.contiguous.default, (x,))
    copy.meta["val"] = x.meta["val"]
    mul.replace_input_with(x, copy)
    gm.recompile()
    canonicalize(gm)
    assert aten.contiguous.default not in targets(gm) and mul.args[0] is x
    assert torch.equal(gm(X), X * 2)


def test_a_contiguous_that_changes_the_layout_is_kept():
    """The model's own layout decision (diffusers Wan's ``hidden_states.contiguous()`` after the patch
    embedding): dropping it leaves every later element-wise op reading strided memory."""
    fn = lambda x, y: x.transpose(1, 2).contiguous() * 2  # noqa: E731
    _, after, gm = canonicalized(fn, X, Y)
    assert after[aten.contiguous.default] == 1
    out = gm(X, Y)
    assert out.is_contiguous() and out.stride() == fn(X, Y).stride()
    assert torch.equal(out, fn(X, Y))


def test_dropout_in_training_mode_is_kept():
    gm = exported(lambda x: F.dropout(x, 0.3, training=True) * 2, X)
    assert targets(gm)[aten.dropout.default] == 1
    canonicalize(gm)
    assert targets(gm)[aten.dropout.default] == 1


def test_hand_written_dropout_with_p_and_train_in_kwargs_is_judged_by_them():
    active, node = _graph_with(aten.dropout.default, p=0.5, train=True)
    canonicalize(active)
    assert node.target == aten.dropout.default
    inactive, _ = _graph_with(aten.dropout.default, p=0.5, train=False)
    canonicalize(inactive)
    assert targets(inactive) == Counter()


# ---------------------------------------------------------------------------------------------
# the pass as a whole
# ---------------------------------------------------------------------------------------------

def _attention_in_every_spelling(q, k, v):
    """[G, N, D] attention spelled with einsum, div, a float cast, eval dropout, type_as, bmm, view."""
    p = (torch.einsum("gnd,gmd->gnm", q, k) / math.sqrt(q.shape[-1])).float().softmax(-1)
    p = F.dropout(p, 0.0, training=False).type_as(v)
    g, n, d = v.shape
    return torch.bmm(p, v.view(g, n, d)).view(1, g, n, d).transpose(2, 3).contiguous()


def test_canonicalize_is_idempotent_and_leaves_only_canonical_spellings():
    q, k, v = (torch.randn(2, 6, 8, generator=gen(i)) for i in range(3))
    before, after, gm = canonicalized(_attention_in_every_spelling, q, k, v)
    spellings = {aten.einsum.default, aten.bmm.default, aten.view.default, aten.div.Tensor, aten.dropout.default,
                 aten.type_as.default, aten._assert_tensor_metadata.default}
    assert spellings <= set(before)
    assert not spellings & set(after)
    assert after[aten.contiguous.default] == 1  # the output's transpose(2, 3).contiguous() changes the layout
    code = gm.code
    canonicalize(gm)
    assert gm.code == code and targets(gm) == after
    [match] = find_attention(gm)
    assert match.found and match.form == "einsum-softmax"
    assert math.isclose(match.scale, 1 / math.sqrt(8), rel_tol=1e-6)
