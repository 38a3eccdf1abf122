"""passes/thread_state.py: the step graph of a converted, frame-symbolic graph. Its placeholders are
the graph's inputs, then the position tables, then six state tensors per site; each hybrid node
becomes one ``hybrid_step`` call that returns the new state; run chunk after chunk it gives the
converted graph's output. Frame-dependent sizes are a*T + b (``frame_dim_of``,
``frame_dim_between``); what cannot be chunked is refused with ConversionError."""
import re

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from rehyat_compile.errors import ConversionError
from rehyat_compile.export import FrameAxis, export_video_model
from rehyat_compile.op import is_hybrid_node
from rehyat_compile.passes import pipeline
from rehyat_compile.passes.rewrite_attention import ConversionOptions, rewrite_attention
from rehyat_compile.passes.thread_state import (STATE_FIELDS, FrameDim, frame_dim_between, frame_dim_of,
                                                hybrid_step, thread_state)
from rehyat_compile.transform import PhiPair

C, DIM, HEADS, FEATURES, M = 4, 16, 2, 4, 4
RAW_SYMBOL = re.compile(r"\bs\d+\b")
CAUSAL = ConversionOptions(chunk_frames=2, overlap_frames=1, causal=True, feature_dim=FEATURES)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, h):
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return h + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM))


class Video(nn.Module):
    """[B, C, T, 2, 2] -> frame-major tokens + a sinusoidal frame table from arange(T) -> blocks."""

    def __init__(self, layers=1, table=True):
        super().__init__()
        torch.manual_seed(0)
        self.config = (layers, table)
        self.proj_in = nn.Linear(C, DIM)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, DIM))
        self.table = table
        self.blocks = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        b, c, t, hh, ww = x.shape
        h = self.proj_in(x.flatten(2).transpose(1, 2))
        if self.table:
            angle = torch.arange(t, dtype=x.dtype)[:, None] * self.freq            # [T, DIM]
            h = h + angle.sin()[:, None, :].expand(t, hh * ww, DIM).reshape(t * hh * ww, DIM)
        for block in self.blocks:
            h = block(h)
        return h


def video(frames=4, seed=0):
    return torch.randn(1, C, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


_EXPORTS: dict = {}


def converted(model, x=None, options=CAUSAL, choose=None, frame_axis=None):
    """(hybrid GraphModule, FrameAxis, sites): a fresh ``ep.module()`` of one export per model
    configuration, analysed and rewritten (``choose(sites)`` picks the sites, all by default)."""
    x = video() if x is None else x
    key = (model.config, tuple(x.shape), frame_axis is None)
    if key not in _EXPORTS:
        if frame_axis is None:
            _EXPORTS[key] = export_video_model(model.eval(), (x,))
        else:
            _EXPORTS[key] = torch.export.export(model.eval(), (x,), strict=False), frame_axis
    ep, axis = _EXPORTS[key]
    gm = ep.module()
    sites = pipeline.run(pipeline.ANALYSIS, gm, pipeline.PassContext(axis, model)).sites
    assert all(s.rewritable for s in sites), sites
    sites = sites if choose is None else choose(sites)
    torch.manual_seed(1)
    gm.feature_maps = nn.ModuleDict({s.key: PhiPair(HEADS, DIM // HEADS, FEATURES) for s in sites})
    result = pipeline.run(pipeline.REWRITE, pipeline.PassResult(gm, tuple(sites)),
                          pipeline.PassContext(axis, model, options))
    return gm, axis, list(result.sites)


def step_program(model, x=None, options=CAUSAL):
    gm, axis, sites = converted(model, x, options)
    result = pipeline.run(pipeline.THREAD_STATE, pipeline.PassResult(gm, tuple(sites)),
                          pipeline.PassContext(axis, model, options))
    return result.artifacts["step_program"], gm, sites


def placeholders(module):
    return [n.name for n in module.graph.find_nodes(op="placeholder")]


def run_chunks(program, x, chunk):
    """Feed ``x`` through the step program chunk by chunk, threading the states."""
    frames = x.shape[2]
    tables = program.table_module(x)
    states = [t for site in program.sites for t in site.initial(x.device)]
    outputs = []
    for start in range(0, frames, chunk):
        stop = min(frames, start + chunk)
        inputs = [x if d is None else d.take(x, start, stop) for d in program.input_dims]
        chunk_tables = [t if d is None else d.take(t, start, stop) for d, t in zip(program.table_dims, tables)]
        result = program.module(*inputs, *chunk_tables, *states)
        assert len(result) == program.n_outputs + len(STATE_FIELDS) * len(program.sites)
        outputs.append(result[:program.n_outputs])
        states = list(result[program.n_outputs:])
    return [torch.cat(parts, d.dim) for d, parts in zip(program.output_dims, zip(*outputs))]


# ---------------------------------------------------------------------------------------------
# the step graph
# ---------------------------------------------------------------------------------------------

def test_step_placeholders_are_inputs_then_tables_then_six_states_per_site():
    program, gm, sites = step_program(Video(layers=2))
    names = placeholders(program.module)
    n_tables = len(program.table_dims)
    assert n_tables >= 1 and program.table_names
    assert names[:1] == placeholders(gm) == ["x"]
    assert all(name.startswith("table_") for name in names[1:1 + n_tables])
    assert names[1 + n_tables:] == [f"state_blocks_{i}_{f}" for i in range(2) for f in STATE_FIELDS]
    assert len(STATE_FIELDS) == 6


def test_each_hybrid_node_becomes_one_hybrid_step_call_returning_the_new_state():
    program, gm, sites = step_program(Video(layers=2))
    assert sum(is_hybrid_node(n) for n in gm.graph.nodes) == 2
    assert not any(is_hybrid_node(n) for n in program.module.graph.nodes)
    steps = program.module.graph.find_nodes(op="call_function", target=hybrid_step)
    assert [n.meta["rehyat_site"] for n in steps] == ["blocks.0", "blocks.1"]
    for node in steps:
        state_args = node.args[5:5 + len(STATE_FIELDS)]
        assert all(a.op == "placeholder" and a.name.startswith("state_") for a in state_args)
        assert node.args[5 + len(STATE_FIELDS):] == (M, 2, 1, 0, 0, pytest.approx(0.5 ** 1.5))
    out = next(iter(program.module.graph.find_nodes(op="output"))).args[0]
    assert len(out) == program.n_outputs + 2 * len(STATE_FIELDS) and program.n_outputs == 1
    new_states = out[program.n_outputs:]
    assert [(s.args[0], s.args[1]) for s in new_states] == [(n, i) for n in steps for i in range(1, 7)]


def test_program_describes_sites_inputs_tables_and_outputs():
    program, _, _ = step_program(Video())
    [site] = program.sites
    assert (site.name, site.tokens_per_frame, site.chunk_frames, site.overlap_frames) == ("blocks.0", M, 2, 1)
    assert (site.extra_before, site.extra_after, site.batch, site.heads, site.head_dim, site.feature_dim) == \
        (0, 0, 1, HEADS, DIM // HEADS, FEATURES)
    assert program.chunk_frames == 2 and program.patch == 1
    assert program.input_dims == [FrameDim(2, 1, 0)]          # x [B, C, T, H, W]: one entry per frame
    assert program.output_dims == [FrameDim(1, M, 0)]          # tokens [B, M*T, DIM]
    assert all(d is not None and d.per_frame in (1, M) for d in program.table_dims)


@pytest.mark.parametrize("frames", [4, 5])
def test_chunks_through_the_step_program_give_the_converted_graph_output(frames):
    program, gm, _ = step_program(Video(layers=2))
    x = video(frames, seed=2)
    with torch.no_grad():
        [streamed] = run_chunks(program, x, program.chunk_frames)
        whole = gm(x)
    assert streamed.shape == whole.shape == (1, M * frames, DIM)
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=1e-5)


def test_frame_table_is_evaluated_for_the_whole_video_so_later_chunks_see_their_offset():
    program, gm, _ = step_program(Video(layers=1))
    x = video(4, seed=3)
    with torch.no_grad():
        whole = gm(x)
        tables = program.table_module(x)
        states = [t for s in program.sites for t in s.initial("cpu")]
        first = program.module(program.input_dims[0].take(x, 0, 2), *[d.take(t, 0, 2) for d, t in
                                                                     zip(program.table_dims, tables)], *states)
        # the same second chunk with the FIRST chunk's table slice: not the true output
        second_inputs = program.input_dims[0].take(x, 2, 4)
        right = program.module(second_inputs, *[d.take(t, 2, 4) for d, t in zip(program.table_dims, tables)],
                               *first[1:])[0]
        wrong = program.module(second_inputs, *[d.take(t, 0, 2) for d, t in zip(program.table_dims, tables)],
                               *first[1:])[0]
    torch.testing.assert_close(right, whole[:, 2 * M:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(wrong, whole[:, 2 * M:], atol=1e-3)


def test_model_without_position_tables_has_no_table_placeholders():
    program, _, _ = step_program(Video(table=False))
    assert program.table_dims == [] and placeholders(program.module) == ["x"] + [
        f"state_blocks_0_{f}" for f in STATE_FIELDS]


# ---------------------------------------------------------------------------------------------
# what cannot be streamed
# ---------------------------------------------------------------------------------------------

def test_graph_without_hybrid_nodes_is_refused():
    gm, _, _ = converted(Video(), options=None)  # the teacher form
    with pytest.raises(ConversionError, match="no rehyat::hybrid_attention node"):
        thread_state(gm)


def test_non_causal_conversion_is_refused():
    gm, _, _ = converted(Video(), options=ConversionOptions(2, 1, False, FEATURES))
    with pytest.raises(ConversionError, match="causal=False"):
        thread_state(gm)


def test_sites_with_different_chunk_sizes_are_refused():
    gm, axis, sites = converted(Video(layers=2), choose=lambda s: [s[0]])
    other = pipeline.run(pipeline.ANALYSIS, gm, pipeline.PassContext(axis)).sites
    [second] = [s for s in other if s.rewritable]
    gm.feature_maps[second.key] = PhiPair(HEADS, DIM // HEADS, FEATURES)
    rewrite_attention(gm, [second], ConversionOptions(3, 1, True, FEATURES), axis)
    with pytest.raises(ConversionError, match=r"one chunk size for every site, got chunk_frames \[2, 3\]"):
        thread_state(gm)


def test_unconverted_attention_over_every_frame_is_refused():
    gm, _, _ = converted(Video(layers=2), choose=lambda s: [s[0]])
    with pytest.raises(ConversionError, match="attends over every frame"):
        thread_state(gm)


def test_fixed_shape_export_is_refused():
    axis = FrameAxis("x", 2, 4, 1, None, None, "static", 0)
    gm, _, _ = converted(Video(table=False), frame_axis=axis)
    with pytest.raises(ConversionError, match="symbolic frame axis"):
        thread_state(gm)


@pytest.mark.parametrize("patch", [0, True, 1.0])
def test_patch_must_be_a_positive_int(patch):
    gm, _, _ = converted(Video())
    with pytest.raises(ValueError, match="patch must be an int >= 1"):
        thread_state(gm, patch=patch)


def test_thread_state_takes_only_graph_modules():
    with pytest.raises(TypeError, match="GraphModule"):
        thread_state(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# frame-dependent sizes
# ---------------------------------------------------------------------------------------------

S = sympy.Symbol("s7", integer=True, positive=True)  # an input-frame symbol as export names them


@pytest.mark.parametrize("size, patch, expected", [
    (4 * S, 1, FrameDim(3, 4, 0)),
    (4 * S + 3, 1, FrameDim(3, 4, 3)),
    (2 * S + 5, 2, FrameDim(3, 4, 5)),      # 2 per input frame, 2 input frames per token frame
    (sympy.floor(S / 2) * 6, 2, FrameDim(3, 6, 0)),
    (17, 1, None),                          # a python int: not frame-dependent
    (sympy.Integer(17), 1, None),
    (sympy.Symbol("u0") + 2, 1, None),      # another symbol (data-dependent): not the frames
    (sympy.Mod(S, 2), 2, None),             # constant whenever the frames fill whole patches
])
def test_frame_dim_of_affine_sizes_in_token_frames(size, patch, expected):
    assert frame_dim_of(size, 3, S, patch) == expected


def test_frame_dim_of_accepts_several_frame_symbols():
    other = sympy.Symbol("s9", integer=True, positive=True)
    assert frame_dim_of(2 * S + 2 * other + 1, 0, frozenset({S, other}), 1) == FrameDim(0, 4, 1)


@pytest.mark.parametrize("size", [S ** 2, 10 - S, 4 * S * S + 1, sympy.floor(S / 2)])
def test_frame_dim_of_non_affine_sizes_raises_with_the_size_in_words(size):
    with pytest.raises(ConversionError, match="a\\*T \\+ b") as info:
        frame_dim_of(size, 0, S, 1)
    assert not RAW_SYMBOL.search(str(info.value)), str(info.value)


def test_frame_dim_size_and_take_keep_the_extra_entries_in_front():
    fd = FrameDim(1, 3, 2)
    assert [fd.size(t) for t in (0, 1, 4)] == [2, 5, 14]
    t = torch.arange(fd.size(4)).reshape(1, -1)
    assert fd.take(t, 1, 3).tolist() == [[0, 1, 5, 6, 7, 8, 9, 10]]
    assert FrameDim(1, 3).take(t[:, 2:], 3, 4).tolist() == [[11, 12, 13]]


@pytest.mark.parametrize("chunk_shape, full_shape, expected", [
    ((1, 8, 16), (1, 8, 16), None),
    ((1, 3 + 4 * 2, 16), (1, 3 + 4 * 5, 16), FrameDim(1, 4, 3)),
    ((2, 16), (5, 16), FrameDim(0, 1, 0)),
])
def test_frame_dim_between_a_chunk_and_the_whole_video(chunk_shape, full_shape, expected):
    assert frame_dim_between(chunk_shape, full_shape, 2, 5) == expected


@pytest.mark.parametrize("chunk_shape, full_shape, chunk_frames, frames", [
    ((1, 8, 4), (1, 20, 10), 2, 5),      # two dims differ
    ((8,), (1, 20), 2, 5),               # ranks differ
    ((8, 4), (20, 4), 5, 5),             # frames equal, shapes not
    ((8, 4), (19, 4), 2, 5),             # 11 more entries for 3 more frames: not a whole number per frame
    ((5, 4), (20, 4), 2, 5),             # 5 per frame: 10 for 2 frames, not 5 (b < 0)
    ((8, 4), (6, 4), 2, 5),              # shrinks with the frames
])
def test_frame_dim_between_shapes_not_a_times_t_plus_b_raises(chunk_shape, full_shape, chunk_frames, frames):
    with pytest.raises(ConversionError, match="cannot chunk it"):
        frame_dim_between(chunk_shape, full_shape, chunk_frames, frames)
