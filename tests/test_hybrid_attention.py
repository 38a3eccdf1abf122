"""The hybrid op's three forms agree with the definition (docs/hybrid_attention.md), and its consequences hold."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import rehyat_compile as rc
from rehyat_compile.attention import attention_masks, make_layout

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw, dtypes=(torch.float32,), causal=None):
    """Random op inputs over B, H, D, F, tokens per frame, frames, Tc, 0 <= To <= Tc, extras."""
    tc = draw(st.integers(1, 5))
    layout = dict(
        tokens_per_frame=draw(st.integers(1, 5)),
        chunk_frames=tc,
        overlap_frames=draw(st.integers(0, tc)),
        causal=draw(st.booleans()) if causal is None else causal,
        extra_before=draw(st.integers(0, 3)),
        extra_after=draw(st.integers(0, 3)),
    )
    frames = draw(st.integers(1, 9))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d, f = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([2, 4, 6]))
    dtype = draw(st.sampled_from(dtypes))
    n = layout["extra_before"] + frames * layout["tokens_per_frame"] + layout["extra_after"]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))
    fq, fk = (torch.rand(b, h, n, f, generator=gen).to(dtype) for _ in range(2))
    return (q, k, v, fq, fk), layout, frames


def video_slice(layout, n):
    return slice(layout["extra_before"], n - layout["extra_after"])


def chunks_of(frames, tc):
    return [(t0, min(t0 + tc, frames)) for t0 in range(0, frames, tc)]


def run_recurrent(inputs, layout, frames):
    """Feed the video chunk by chunk (extra tokens with every chunk); return video outputs, state."""
    m, eb, ea = layout["tokens_per_frame"], layout["extra_before"], layout["extra_after"]
    n = inputs[0].shape[2]
    kw = {k: v for k, v in layout.items() if k != "causal"}
    state, outs, shapes = None, [], set()
    for t0, t1 in chunks_of(frames, layout["chunk_frames"]):
        idx = [*range(eb), *range(eb + t0 * m, eb + t1 * m), *range(n - ea, n)]
        y, state = rc.hybrid_attention_step(*(x[:, :, idx] for x in inputs), state, **kw)
        outs.append(y[:, :, eb:eb + (t1 - t0) * m])
        shapes.add(tuple(tuple(t.shape) for t in state))
    assert len(shapes) == 1, "the carried state changed shape between chunks"
    return torch.cat(outs, dim=2), state


@SETTINGS
@given(problems(), st.sampled_from(["grouped", "masked"]), st.sampled_from(["cumsum", "matmul"]))
def test_chunked_equals_reference_fp32(problem, windows, prefix):
    inputs, layout, _ = problem
    ref = rc.hybrid_attention_reference(*inputs, **layout)
    torch.testing.assert_close(rc.hybrid_attention(*inputs, **layout), ref, rtol=1e-5, atol=1e-5)
    chunked = rc.hybrid_attention_chunked(*inputs, **layout, windows=windows, prefix=prefix)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(problems(dtypes=(torch.bfloat16, torch.float16)))
def test_chunked_half_precision_matches_fp32_definition(problem):
    """bf16/fp16 inputs, fp32 state: within the output dtype's rounding of the fp32 definition
    (tolerance 1e-2 absolute + relative for bf16, 1e-3 for fp16)."""
    inputs, layout, _ = problem
    ref = rc.hybrid_attention_reference(*(x.float() for x in inputs), **layout)
    out = rc.hybrid_attention(*inputs, **layout)
    assert out.dtype == inputs[0].dtype
    tol = 1e-2 if out.dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@SETTINGS
@given(problems(dtypes=(torch.float32, torch.float64), causal=True))
def test_recurrent_equals_parallel_causal(problem):
    inputs, layout, frames = problem
    parallel = rc.hybrid_attention(*inputs, **layout)
    recurrent, _ = run_recurrent(inputs, layout, frames)
    tol = 1e-5 if inputs[0].dtype == torch.float32 else 1e-12
    torch.testing.assert_close(recurrent, parallel[:, :, video_slice(layout, parallel.shape[2])],
                               rtol=tol, atol=tol)


@SETTINGS
@given(problems())
def test_one_chunk_covering_video_is_softmax_attention(problem):
    inputs, layout, frames = problem
    layout = {**layout, "chunk_frames": frames + layout["chunk_frames"] - 1, "overlap_frames": 0}
    q, k, v = inputs[:3]
    torch.testing.assert_close(rc.hybrid_attention(*inputs, **layout), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


@SETTINGS
@given(problems(causal=True), st.data())
def test_causal_outputs_ignore_later_frames(problem, data):
    inputs, layout, frames = problem
    tc, m, eb = layout["chunk_frames"], layout["tokens_per_frame"], layout["extra_before"]
    chunk = data.draw(st.integers(0, (frames - 1) // tc))
    stop = eb + min((chunk + 1) * tc, frames) * m          # first token after chunk t
    video_end = inputs[0].shape[2] - layout["extra_after"]
    changed = [x.clone() for x in inputs]
    for x in changed:
        x[:, :, stop:video_end] = torch.rand_like(x[:, :, stop:video_end]) * 3
    before = rc.hybrid_attention(*inputs, **layout)[:, :, eb:stop]
    after = rc.hybrid_attention(*changed, **layout)[:, :, eb:stop]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_state_size_independent_of_frames(overlap):
    layout = dict(tokens_per_frame=3, chunk_frames=2, overlap_frames=overlap)
    sizes = []
    for frames in (5, 9):
        n = frames * 3
        inputs = [torch.randn(1, 2, n, 8) for _ in range(3)] + [torch.rand(1, 2, n, 4) for _ in range(2)]
        _, state = run_recurrent(inputs, {**layout, "causal": True, "extra_before": 0, "extra_after": 0}, frames)
        sizes.append((state.nbytes(), [tuple(t.shape) for t in state]))
    assert sizes[0] == sizes[1]


def _phi_grads(fn, inputs, layout, maps):
    for p in maps.parameters():
        p.grad = None
    q, k, v = inputs
    out = fn(q, k, v, maps[0](q), maps[1](k), **layout)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [p.grad.clone() for p in maps.parameters()]


@settings(max_examples=10, deadline=None)
@given(problems())
def test_phi_gradients_match_reference(problem):
    """In float64, so the comparison is of the two forms and not of fp32 summation order."""
    inputs, layout, _ = problem
    h, d = inputs[0].shape[1], inputs[0].shape[-1]
    torch.manual_seed(0)
    maps = torch.nn.ModuleList([rc.FeatureMap(h, d, feature_dim=4, hidden=8, init_bias=0.0) for _ in range(2)])
    maps = maps.double()
    qkv = [x.double() for x in inputs[:3]]
    ref = _phi_grads(rc.hybrid_attention_reference, qkv, layout, maps)
    fast = _phi_grads(rc.hybrid_attention, qkv, layout, maps)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


class _HybridBlock(torch.nn.Module):
    def __init__(self, heads=2, dim=8, extra_before=2):
        super().__init__()
        self.phi_q, self.phi_k = rc.FeatureMap(heads, dim, feature_dim=4), rc.FeatureMap(heads, dim, feature_dim=4)
        self.extra_before = extra_before

    def forward(self, q, k, v):
        return rc.hybrid_attention(q, k, v, self.phi_q(q), self.phi_k(k), tokens_per_frame=3, chunk_frames=2,
                                   overlap_frames=1, extra_before=self.extra_before)


def _symbolic_export(block, frames=5):
    inputs = [torch.randn(1, 2, 2 + 3 * frames, 8) for _ in range(3)]
    t = torch.export.Dim("T", min=2, max=64)
    ep = torch.export.export(block, tuple(inputs), dynamic_shapes=({2: 2 + 3 * t},) * 3)
    return ep, inputs


def test_export_keeps_one_custom_op_node():
    ep, _ = _symbolic_export(_HybridBlock())
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rehyat.hybrid_attention.default) == 1


@pytest.mark.parametrize("prefix", ["cumsum", "matmul"])
def test_decomposition_gives_same_numbers(prefix):
    block = _HybridBlock()
    ep, _ = _symbolic_export(block)
    decomposed = ep.run_decompositions(rc.decompositions(prefix))
    targets = {n.target for n in decomposed.graph.nodes if n.op == "call_function"}
    assert torch.ops.rehyat.hybrid_attention.default not in targets
    for frames in (5, 8):                       # the frame axis stayed symbolic
        inputs = [torch.randn(1, 2, 2 + 3 * frames, 8) for _ in range(3)]
        torch.testing.assert_close(decomposed.module()(*inputs), block(*inputs), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(problems())
def test_flop_formula_counts_the_definition(problem):
    """Softmax FLOPs = 4*D per allowed (query, key) pair of the reference masks; FlopCounterMode
    reports the same formula for the op."""
    inputs, layout, _ = problem
    b, h, n, d = inputs[0].shape
    f = inputs[3].shape[-1]
    window, _ = attention_masks(make_layout(**layout), n)
    video = n - layout["extra_before"] - layout["extra_after"]
    builds = 1 if layout["causal"] else 2
    expected = b * h * (4 * d * int(window.sum()) + 2 * builds * video * f * d + 2 * video * f * (d + 1))
    assert rc.hybrid_attention_flops(b, h, n, d, f, **layout) == expected
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        rc.hybrid_attention(*inputs, **layout)
    assert counter.get_total_flops() == expected


BAD_LAYOUTS = [
    (dict(overlap_frames=3), ValueError, "overlap_frames"),
    (dict(chunk_frames=0), ValueError, "chunk_frames"),
    (dict(tokens_per_frame=5), ValueError, "token count"),
    (dict(extra_before=-1), ValueError, "extra_before"),
    (dict(chunk_frames=2.0), TypeError, "chunk_frames"),
]


@pytest.mark.parametrize("change,error,word", BAD_LAYOUTS)
def test_bad_layout_names_the_argument(change, error, word):
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    fq, fk = torch.rand(1, 2, 12, 4), torch.rand(1, 2, 12, 4)
    layout = {**dict(tokens_per_frame=3, chunk_frames=2, overlap_frames=1), **change}
    for fn in (rc.hybrid_attention, rc.hybrid_attention_reference):
        with pytest.raises(error, match=word):
            fn(q, k, v, fq, fk, **layout)


def _bad_tensors():
    ok = lambda *s: torch.randn(*s)  # noqa: E731
    return [
        ("k", dict(k=ok(1, 2, 10, 8)), ValueError),
        ("v", dict(v=ok(1, 2, 12, 8).double()), TypeError),
        ("fk", dict(fk=ok(1, 2, 12, 5)), ValueError),
        ("fq", dict(fq=ok(1, 2, 12).abs()), ValueError),
        ("q", dict(q=torch.ones(1, 2, 12, 8, dtype=torch.long)), TypeError),
        ("v", dict(v=torch.empty(1, 2, 12, 8, device="meta")), ValueError),
        ("fq", dict(fq=ok(1, 2, 12, 4).half()), TypeError),
    ]


@pytest.mark.parametrize("word,change,error", _bad_tensors())
def test_bad_tensors_name_the_argument(word, change, error):
    args = dict(q=torch.randn(1, 2, 12, 8), k=torch.randn(1, 2, 12, 8), v=torch.randn(1, 2, 12, 8),
                fq=torch.rand(1, 2, 12, 4), fk=torch.rand(1, 2, 12, 4))
    args.update(change)
    with pytest.raises(error, match=rf"\b{word}\b"):
        rc.hybrid_attention(**args, tokens_per_frame=3, chunk_frames=2, overlap_frames=1)


def test_step_exports_with_state_as_inputs_and_outputs():
    def step(q, k, v, fq, fk, *state):
        y, new = rc.hybrid_attention_step(q, k, v, fq, fk, rc.HybridState(*state), tokens_per_frame=3,
                                          chunk_frames=2, overlap_frames=1, extra_before=2)
        return y, *new

    class Step(torch.nn.Module):
        def forward(self, *a):
            return step(*a)

    chunk = [torch.randn(1, 2, 8, 4) for _ in range(3)] + [torch.rand(1, 2, 8, 3) for _ in range(2)]
    _, state = rc.hybrid_attention_step(*chunk, None, tokens_per_frame=3, chunk_frames=2, overlap_frames=1,
                                        extra_before=2)
    ep = torch.export.export(Step(), (*chunk, *state))
    torch.testing.assert_close(ep.module()(*chunk, *state), Step()(*chunk, *state))


def test_step_rejects_chunk_longer_than_chunk_frames():
    x = torch.randn(1, 1, 9, 4)
    with pytest.raises(ValueError, match="chunk_frames"):
        rc.hybrid_attention_step(x, x, x, x.abs(), x.abs(), None, tokens_per_frame=3, chunk_frames=2,
                                 overlap_frames=1)


def _step_op_args(frames=2, m=4, heads=2, d=8, feat=4, overlap=1):
    gen = torch.Generator().manual_seed(0)
    n = frames * m
    q, k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(3))
    fq, fk = (torch.rand(1, heads, n, feat, generator=gen) for _ in range(2))
    state = rc.attention.initial_state(k, v, fk, overlap * m)
    return (q, k, v, fq, fk, *state, m, 2, overlap, 0, 0, d ** -0.5)


def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake implementation and aliasing of both ops (torch.library.opcheck: what torch.compile relies on)."""
    step_args = _step_op_args()
    torch.library.opcheck(torch.ops.rehyat.hybrid_attention_step.default, step_args)
    q, k, v, fq, fk = step_args[:5]
    torch.library.opcheck(torch.ops.rehyat.hybrid_attention.default, (q, k, v, fq, fk, 4, 2, 1, True, 0, 0, 0.35))
    steps_args = _step_op_args(frames=5)   # chunks of 2 frames: 2, 2 and a short 1
    torch.library.opcheck(torch.ops.rehyat.hybrid_attention_steps.default, steps_args[:-3] + steps_args[-1:])


@pytest.mark.parametrize("frames", [3, 4, 5])
def test_steps_op_is_the_chunk_by_chunk_stream(frames):
    """``rehyat::hybrid_attention_steps`` (the grouped step under torch.compile, op.py) computes what stepping
    the chunks one by one computes, short last chunk included, and from the empty state the causal
    parallel form's output."""
    args = _step_op_args(frames=frames)
    q, k, v, fq, fk, *state = args[:11]
    outs = torch.ops.rehyat.hybrid_attention_steps.default(*args[:-3], args[-1])
    parallel = rc.hybrid_attention_chunked(q, k, v, fq, fk, tokens_per_frame=4, chunk_frames=2, overlap_frames=1,
                                           causal=True, scale=args[-1])
    torch.testing.assert_close(outs[0], parallel, rtol=1e-5, atol=1e-6)
    new = rc.attention.HybridState(*state)
    ys = []
    for start in range(0, frames, 2):
        rows = slice(start * 4, min(start + 2, frames) * 4)
        y, new = rc.hybrid_attention_step(q[:, :, rows], k[:, :, rows], v[:, :, rows], fq[:, :, rows],
                                          fk[:, :, rows], new, tokens_per_frame=4, chunk_frames=2, overlap_frames=1)
        ys.append(y)
    torch.testing.assert_close(outs[0], torch.cat(ys, dim=2), rtol=1e-5, atol=1e-6)
    for got, want in zip(outs[1:], new, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_step_op_outputs_never_share_an_input_memory():
    """A state the step computes may be an input itself (the fused step's new cache is the chunk's k when the
    chunk is exactly the overlap and contiguous): the op returns it in its own memory."""
    from rehyat_compile.op import _step_outputs
    q, k, v, fq, fk, *state = _step_op_args()[:11]
    y = torch.randn(1, 8, 2, 8).transpose(1, 2)
    new = [t.clone() for t in state]
    new[2] = k                                # contiguous, offset 0, and an input
    out = _step_outputs(y, new, (q, k, v, fq, fk, *state))
    assert out[3].untyped_storage().data_ptr() != k.untyped_storage().data_ptr() and torch.equal(out[3], k)
    assert out[0] is y and out[1] is new[0]   # nothing else is copied


@SETTINGS
@given(problems(dtypes=(torch.float32, torch.float64), causal=True), st.integers(1, 4))
def test_several_chunks_in_one_call_equal_chunk_by_chunk_and_parallel(problem, groups):
    """rc.attention.hybrid_attention_steps: the frames of several chunks stepped in turn in one call."""
    from rehyat_compile.attention import hybrid_attention_steps
    inputs, layout, frames = problem
    layout = {**layout, "extra_before": 0, "extra_after": 0}
    m, tc = layout["tokens_per_frame"], layout["chunk_frames"]
    inputs = tuple(x[:, :, :frames * m] for x in inputs)
    kw = {k: v for k, v in layout.items() if k != "causal"}
    ref, ref_state = run_recurrent(inputs, layout, frames)
    state, outs = None, []
    for t0 in range(0, frames, groups * tc):       # `groups` chunks per call, the last call shorter
        rows = slice(t0 * m, min(t0 + groups * tc, frames) * m)
        y, state = hybrid_attention_steps(*(x[:, :, rows] for x in inputs), state, **kw)
        outs.append(y)
    got = torch.cat(outs, dim=2)
    assert torch.equal(got, ref) and all(torch.equal(a, b) for a, b in zip(state, ref_state))
    assert type(state) is type(ref_state)          # a short last chunk still marks the state final
    tol = 1e-5 if got.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, rc.hybrid_attention(*inputs, **layout), rtol=tol, atol=tol)


def test_several_chunks_in_one_call_refuse_extra_tokens():
    from rehyat_compile.attention import hybrid_attention_steps
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2 + 4 * 3, 8, generator=gen) for _ in range(3))
    fq, fk = (torch.rand(1, 2, 14, 4, generator=gen) for _ in range(2))
    with pytest.raises(ValueError, match="extra_before = extra_after = 0"):
        hybrid_attention_steps(q, k, v, fq, fk, None, tokens_per_frame=3, chunk_frames=2, overlap_frames=1,
                               extra_before=2)
