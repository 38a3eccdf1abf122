"""rc.stream / thread_state: the converted DiT runs chunk by chunk with a fixed-size state and gives
the parallel causal form's output (docs/hybrid_attention.md "Inside a diffusion step")."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.export import Dim

import rehyat_compile as rc
from rehyat_compile.passes.thread_state import STATE_FIELDS, thread_state
from rehyat_compile.passes.rewrite_attention import ConversionOptions
from rehyat_compile.stream import move_views, step_spans, table_home, table_key
from rehyat_compile.transform import ConversionPlan
from models import MODELS

SETTINGS = settings(max_examples=8, deadline=None)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def outputs_close(got, want, tol=1e-4):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < tol, rel_err(g, w)


# ---------------------------------------------------------------------------------------------
# A small video model covering what streaming must keep: temporal patch, a learned frame
# embedding sliced by the frame count, RoPE-like angles from arange(T), per-frame timesteps,
# extra (text) tokens before the video.
# ---------------------------------------------------------------------------------------------

class TinyVideoDiT(nn.Module):
    def __init__(self, *, patch=1, extra=0, chunk_frames=2, overlap_frames=1, causal=True, channels=3, side=2,
                 dim=16, heads=2, feature_dim=4, max_frames=32):
        super().__init__()
        torch.manual_seed(0)
        self.config = {"patch_size_t": patch}
        self.patch, self.extra, self.heads, self.dim = patch, extra, heads, dim
        self.layout = dict(tokens_per_frame=side * side, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                           causal=causal, extra_before=extra)
        self.proj_in = nn.Linear(channels * patch, dim)
        self.frame_embedding = nn.Parameter(torch.randn(max_frames, dim) * 0.3)
        self.time = nn.Linear(1, dim)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, dim // 2))
        self.text = nn.Parameter(torch.randn(extra, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.phi_q = rc.FeatureMap(heads, dim // heads, feature_dim)
        self.phi_k = rc.FeatureMap(heads, dim // heads, feature_dim)
        self.out = nn.Linear(dim, channels * patch)

    def forward(self, x, t):
        """x [B, C, F, H, W] latents, t [B, F] per-frame timesteps -> [B, C, F, H, W]."""
        b, c, f, hh, ww = x.shape
        p = self.patch
        frames = f // p
        tok = x.reshape(b, c, frames, p, hh, ww).permute(0, 2, 4, 5, 1, 3).reshape(b, frames, hh * ww, c * p)
        h = self.proj_in(tok) + self.frame_embedding[:frames][None, :, None]
        h = h + self.time(t.reshape(b, frames, p).mean(-1, keepdim=True))[:, :, None]
        angle = torch.arange(frames, dtype=x.dtype, device=x.device)[:, None] * self.freq  # [T, dim/2]
        even, odd = h[..., 0::2], h[..., 1::2]
        cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
        h = torch.cat([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(b, frames * hh * ww, self.dim)
        h = torch.cat([self.text.expand(b, -1, -1), h], 1)
        n = h.shape[1]
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        y = rc.hybrid_attention(q, k, v, self.phi_q(q), self.phi_k(k), **self.layout)
        y = (y.transpose(1, 2).reshape(b, n, self.dim) + h)[:, self.extra:]
        out = self.out(y).reshape(b, frames, hh, ww, c, p)
        return out.permute(0, 4, 1, 5, 2, 3).reshape(b, c, f, hh, ww)


class ExportedHybrid:
    """The part of HybridModel that rc.stream uses, around a model that calls rc.hybrid_attention
    itself: its graph exported with the frame axis (latents dim 2, timesteps dim 1) symbolic."""

    def __init__(self, model, x, t):
        self.original = model
        layout = model.layout
        self.plan = ConversionPlan(ConversionOptions(layout["chunk_frames"], layout["overlap_frames"],
                                                     layout["causal"], model.phi_q.feature_dim))
        ep = torch.export.export(model, (x, t), dynamic_shapes=({2: Dim.AUTO}, {1: Dim.AUTO}), strict=False)
        self.gm = ep.module()

    def graph_module(self, *args, **kwargs):
        return self.gm


def tiny_inputs(model, frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = frames * model.patch
    return torch.randn(1, 3, f, 2, 2, generator=gen), torch.rand(1, f, generator=gen)


@SETTINGS
@given(frames=st.integers(1, 7), chunk=st.integers(1, 3), overlap=st.integers(0, 3), patch=st.sampled_from([1, 2]),
       extra=st.sampled_from([0, 3]))
def test_streamed_equals_parallel_causal_with_positions_patch_and_extra_tokens(frames, chunk, overlap, patch, extra):
    overlap = min(overlap, chunk)
    model = TinyVideoDiT(patch=patch, extra=extra, chunk_frames=chunk, overlap_frames=overlap).eval()
    hybrid = ExportedHybrid(model, *tiny_inputs(model, 4))
    runner = rc.stream(hybrid)
    x, t = tiny_inputs(model, frames, seed=1)
    with torch.no_grad():
        outputs_close(runner(x, t), model(x, t))


def test_position_tables_become_step_inputs_sliced_per_chunk():
    model = TinyVideoDiT(patch=2).eval()
    program = thread_state(ExportedHybrid(model, *tiny_inputs(model, 4)).gm, patch=2)
    # latents and per-frame timesteps are chunked in input frames (2 per token frame)
    assert [None if d is None else d.per_frame for d in program.input_dims] == [2, 2]
    assert program.table_dims and all(d is not None for d in program.table_dims)
    assert len(program.sites) == 1 and program.chunk_frames == 2
    n_in = len(program.input_dims) + len(program.table_dims) + len(STATE_FIELDS)
    assert len(program.module.graph.find_nodes(op="placeholder")) == n_in


def test_iter_chunks_yield_each_chunk_in_order():
    model = TinyVideoDiT(chunk_frames=2, overlap_frames=1).eval()
    runner = rc.stream(ExportedHybrid(model, *tiny_inputs(model, 4)))
    x, t = tiny_inputs(model, 5, seed=2)
    with torch.no_grad():
        chunks = list(runner.iter_chunks(x, t))
        whole = runner(x, t)
    assert [c.shape[2] for c in chunks] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(chunks, 2), whole)


def test_earlier_chunks_do_not_see_later_frames():
    model = TinyVideoDiT(chunk_frames=2, overlap_frames=1).eval()
    runner = rc.stream(ExportedHybrid(model, *tiny_inputs(model, 4)))
    x, t = tiny_inputs(model, 6, seed=3)
    x2 = x.clone()
    x2[:, :, 4:] += 1.0
    with torch.no_grad():
        first, changed = runner(x, t), runner(x2, t)
    torch.testing.assert_close(first[:, :, :4], changed[:, :, :4])
    assert not torch.allclose(first[:, :, 4:], changed[:, :, 4:])


def test_non_causal_toy_conversion_is_refused():
    model = TinyVideoDiT(causal=False).eval()
    with pytest.raises(rc.ConversionError, match="causal"):
        rc.stream(ExportedHybrid(model, *tiny_inputs(model, 4)))


# ---------------------------------------------------------------------------------------------
# diffusers models (tests/models.py), converted with rc.transform
# ---------------------------------------------------------------------------------------------

def converted(name, chunk_frames, overlap_frames, frames=None, **options):
    model, args, kwargs = MODELS[name]() if frames is None else MODELS[name](frames)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=chunk_frames, overlap_frames=overlap_frames, **options)
    return model, hybrid


# (model, Tc, To, frame counts); every case ends on a short last chunk at one of its frame counts.
# WanVACE (fixed-size control video) and Cosmos (fixed-shape export) take the path that traces a
# chunk-length graph too (one export per chunk length and video length: fewer frame counts).
VIDEO_ONLY = [("wan2.1-t2v", 2, 1, (5, 7)), ("wan2.1-t2v", 3, 0, (5, 7)), ("wan2.1-t2v", 3, 3, (5, 7)),
              ("skyreels-v2", 2, 1, (5, 7)), ("allegro", 3, 1, (5, 7)), ("wan-vace", 2, 1, (5,)),
              ("cosmos", 3, 2, (5, 7))]


@pytest.mark.slow
@pytest.mark.parametrize("name,chunk_frames,overlap_frames,frame_counts", VIDEO_ONLY)
def test_streamed_equals_parallel_causal_converted_model(name, chunk_frames, overlap_frames, frame_counts):
    _, hybrid = converted(name, chunk_frames, overlap_frames, frames=5)
    runner = rc.stream(hybrid)
    for frames in frame_counts:
        _, args, kwargs = MODELS[name](frames)
        with torch.no_grad():
            outputs_close(runner(*args, **kwargs), hybrid(*args, **kwargs))


@pytest.mark.slow
# chunk lengths 4+1 and 3+3+1 (chunks of 2 frames: tests/test_bad_inputs.py)
@pytest.mark.parametrize("frames,chunk_frames,overlap_frames", [(5, 4, 1), (7, 3, 2)])
def test_streamed_equals_parallel_causal_ltx_video(frames, chunk_frames, overlap_frames):
    """LTX-Video takes pre-patchified tokens and num_frames: a fixed-shape export with video_shape."""
    _, hybrid = converted("ltx-video", chunk_frames, overlap_frames, frames=frames, video_shape=(frames, 4, 4))
    _, args, kwargs = MODELS["ltx-video"](frames)
    runner = rc.stream(hybrid)
    with torch.no_grad():
        outputs_close(runner(*args, **kwargs), hybrid(*args, **kwargs))
    # the token input is chunked in tokens, num_frames becomes the chunk's frame count
    dims = runner.program(*args, **kwargs).input_dims
    assert dims[0].per_frame == 16 and "FrameCount" in repr(dims)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hunyuan-video", "mochi", "cogvideox-1.5"])
def test_joint_model_one_chunk_equals_original_and_chunked_is_finite(name):
    model, args, kwargs = MODELS[name]()
    with torch.no_grad():
        original = model(*args, **kwargs)
        outputs_close(rc.stream(converted(name, 5, 1)[1])(*args, **kwargs), original)
        chunked = rc.stream(converted(name, 2, 1)[1])(*args, **kwargs)
    leaves = torch.utils._pytree.tree_leaves(chunked)
    assert [x.shape for x in leaves] == [x.shape for x in torch.utils._pytree.tree_leaves(original)]
    assert all(torch.isfinite(x).all() for x in leaves)


def test_state_bytes_do_not_depend_on_frames():
    _, hybrid = converted("wan2.1-t2v", 2, 1)
    runner = rc.stream(hybrid)
    sizes = []
    for frames in (5, 9):
        _, args, kwargs = MODELS["wan2.1-t2v"](frames)
        sizes.append(runner.state_nbytes(*args, **kwargs))
    # 2 sites x (S 2x64x16 + z 2x64 fp32, overlap K/V 2x16x16 + phi_k 2x16x64 fp32, 16 bools)
    per_site = (2 * 64 * 16 + 2 * 64) * 4 + (2 * 2 * 16 * 16 + 2 * 16 * 64) * 4 + 16
    assert sizes == [2 * per_site, 2 * per_site]


@pytest.mark.parametrize("name", ["wan2.1-t2v", pytest.param("cosmos", marks=pytest.mark.slow)])
def test_step_graph_exports_with_states_as_inputs_and_outputs(name):
    _, hybrid = converted(name, 2, 1)
    runner = rc.stream(hybrid)
    _, args, kwargs = MODELS[name](5)
    module, example = runner.step_module(*args, **kwargs)
    ep = torch.export.export(module, example, strict=False)
    signature = runner.signature(*args, **kwargs)
    n_states = len(module.state_names)
    assert n_states == 2 * len(STATE_FIELDS) == len(signature["states_in"])
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(user_inputs) == len(example)
    assert len(ep.graph_signature.user_outputs) == len(signature["outputs"]) + n_states
    with torch.no_grad():
        eager, exported = module(*example), ep.module()(*example)
        first = module(*example[:-n_states])  # the state left out: the first chunk's
    for a, b, c in zip(eager, exported, first):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # the graph's shapes are the chunk's (2 frames), not the export example's
    out = next(iter(module.step.graph.find_nodes(op="output"))).args[0][0]
    assert tuple(out.meta["val"].shape) == (1, 4, 2, 8, 8)


def test_non_causal_conversion_is_refused():
    _, hybrid = converted("wan2.1-t2v", 2, 1, causal=False)
    with pytest.raises(rc.ConversionError, match="causal=True"):
        rc.stream(hybrid)


def test_unconverted_video_self_attention_is_refused():
    _, hybrid = converted("wan2.1-t2v", 2, 1, layers=["blocks.0.attn1"])
    _, args, kwargs = MODELS["wan2.1-t2v"](5)
    with pytest.raises(rc.ConversionError, match="every frame"):
        rc.stream(hybrid)(*args, **kwargs)


def test_runner_follows_parameters_and_buffers_replaced_after_it_was_built():
    model, hybrid = converted("wan2.1-t2v", 2, 1)
    runner = rc.stream(hybrid)
    _, args, kwargs = MODELS["wan2.1-t2v"](5)
    with torch.no_grad():
        before = runner(*args, **kwargs)
        model.rope.freqs_cos = model.rope.freqs_cos * 0.5   # a new buffer object, as .to() makes
        hybrid.feature_maps["blocks_0_attn1"].phi_k.w2.mul_(2.0)  # as a distillation step would
        after, want = runner(*args, **kwargs), hybrid(*args, **kwargs)
    outputs_close(after, want)
    assert rel_err(after[0], before[0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Several chunks per step program (rc.stream(..., chunks_per_step=G))
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(frames=st.integers(1, 8), chunk=st.integers(1, 3), overlap=st.integers(0, 3), patch=st.sampled_from([1, 2]),
       per_step=st.integers(2, 4))
def test_several_chunks_per_step_is_the_same_function(frames, chunk, overlap, patch, per_step):
    overlap = min(overlap, chunk)
    model = TinyVideoDiT(patch=patch, chunk_frames=chunk, overlap_frames=overlap).eval()
    hybrid = ExportedHybrid(model, *tiny_inputs(model, 4))
    x, t = tiny_inputs(model, frames, seed=1)
    with torch.no_grad():
        one = rc.stream(hybrid)(x, t)
        several = rc.stream(hybrid, chunks_per_step=per_step)
        outputs_close(several(x, t), one, tol=1e-5)
        outputs_close(several(x, t), model(x, t))
        # steps as step_spans cuts them: one output per step
        assert len(list(several.iter_chunks(x, t))) == len(step_spans(frames, chunk, per_step))


@given(frames=st.integers(1, 200), chunk=st.integers(1, 5), per_step=st.integers(1, 16))
def test_steps_cover_the_video_in_the_fewest_bounded_steps(frames, chunk, per_step):
    spans = step_spans(frames, chunk, per_step)
    assert spans[0][0] == 0 and spans[-1][1] == frames
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))          # contiguous, in order
    lengths = [stop - start for start, stop in spans]
    whole, short = divmod(frames, chunk)
    if per_step == 1:
        assert lengths == [chunk] * whole + ([short] if short else [])
        return
    step = per_step * chunk
    # every step but the last is G whole chunks, the last holds what is left (1 .. G chunks' frames)
    assert lengths[:-1] == [step] * (len(lengths) - 1) and 0 < lengths[-1] <= step
    assert len(spans) == -(-frames // step)                              # no fewer steps are possible


def test_a_runner_over_many_lengths_captures_the_full_step_once():
    """Every video length from 1 to 400 frames (Tc = 3, G = 7): full steps are all 21 frames, and the
    last steps take each of the 21 lengths 1 .. 21 (one graph per remainder)."""
    spans = [step_spans(f, 3, 7) for f in range(1, 401)]
    assert {stop - start for s in spans for start, stop in s[:-1]} == {21}
    assert {s[-1][1] - s[-1][0] for s in spans} == set(range(1, 22))


@pytest.mark.slow
@pytest.mark.parametrize("name,chunk_frames,overlap_frames,frames,per_step",
                         [("wan2.1-t2v", 2, 1, 7, 2), ("wan2.1-t2v", 2, 1, 7, 4), ("cosmos", 2, 1, 5, 2)])
def test_several_chunks_per_step_equal_the_converted_model(name, chunk_frames, overlap_frames, frames, per_step):
    """Wan (symbolic frame axis: one step program for every length) and Cosmos (fixed-shape export: a
    chunk trace per step length, here 4 frames then a last step of 1)."""
    _, hybrid = converted(name, chunk_frames, overlap_frames, frames=5)
    _, args, kwargs = MODELS[name](frames)
    with torch.no_grad():
        outputs_close(rc.stream(hybrid, chunks_per_step=per_step)(*args, **kwargs), hybrid(*args, **kwargs))


def test_several_chunks_per_step_are_refused_for_extra_tokens_and_bad_counts():
    model = TinyVideoDiT(extra=3, chunk_frames=2, overlap_frames=1).eval()
    hybrid = ExportedHybrid(model, *tiny_inputs(model, 4))
    x, t = tiny_inputs(model, 5, seed=1)
    with torch.no_grad(), pytest.raises(rc.ConversionError, match="chunks_per_step=2.*extra"):
        rc.stream(hybrid, chunks_per_step=2)(x, t)
    with torch.no_grad():  # one chunk per step is the same runner as before
        outputs_close(rc.stream(hybrid, chunks_per_step=1)(x, t), model(x, t))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunks_per_step"):
            rc.stream(hybrid, chunks_per_step=bad)


# ---------------------------------------------------------------------------------------------
# The whole video's position tables, kept between calls (stream.py, table_key / table_home)
# ---------------------------------------------------------------------------------------------

def _kept(runner, x, t):
    return runner._kept_tables[id(runner.program(x, t))]


def test_a_call_of_the_same_shapes_reuses_the_last_calls_tables_and_another_length_makes_new_ones():
    model = TinyVideoDiT().eval()
    runner = rc.stream(ExportedHybrid(model, *tiny_inputs(model, 4)))
    x, t = tiny_inputs(model, 5, seed=1)
    with torch.no_grad():
        runner(x, t)
        key, tables = _kept(runner, x, t)
        assert tables and all(isinstance(table, torch.Tensor) for table in tables)
        y = runner(x * 2, t.flip(1))  # other values, the same shapes: a denoising loop's next step
        assert _kept(runner, x, t)[1] is tables
        outputs_close(y, model(x * 2, t.flip(1)))
        x3, t3 = tiny_inputs(model, 3, seed=2)
        y3 = runner(x3, t3)
        assert _kept(runner, x3, t3)[0] != key
        outputs_close(y3, model(x3, t3))


@pytest.mark.parametrize("constant", ["frame_embedding", "freq"])
def test_tables_are_made_again_when_a_constant_they_read_changes_in_place(constant):
    model = TinyVideoDiT().eval()
    hybrid = ExportedHybrid(model, *tiny_inputs(model, 4))
    runner = rc.stream(hybrid)
    x, t = tiny_inputs(model, 5, seed=1)
    with torch.no_grad():
        before = runner(x, t)
        _, old = _kept(runner, x, t)
        weights = dict(hybrid.gm.named_parameters()) | dict(hybrid.gm.named_buffers())
        weights[constant].mul_(-0.5)  # load_state_dict, an optimizer step: an in-place write
        after = runner(x, t)
        assert _kept(runner, x, t)[1] is not old
        outputs_close(after, rc.stream(hybrid)(x, t))  # a fresh runner: nothing kept
        assert rel_err(after, before) > 1e-3


def test_tables_that_carry_gradients_are_made_on_every_call_and_not_kept():
    model = TinyVideoDiT()
    runner = rc.stream(ExportedHybrid(model, *tiny_inputs(model, 4)))
    x, t = tiny_inputs(model, 5, seed=1)
    runner(x, t).square().sum().backward()  # the learned frame embedding is a table that trains
    embedding = dict(runner.hybrid.gm.named_parameters())["frame_embedding"]
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    assert not runner._kept_tables


def test_tables_live_in_host_memory_for_a_cuda_model_unless_a_table_device_is_named():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert table_home(cuda, None) == cpu
    assert table_home(cuda, cuda) == cuda
    assert table_home(cpu, None) == cpu
    assert table_home(torch.device("meta"), None) == torch.device("meta")


def test_values_that_are_one_view_move_as_one_tensor_and_other_views_apart():
    base = torch.arange(12.0).view(3, 4)
    same_a, same_b, other = base[:, ::2], base[:, ::2], base[:, 1::2]
    moved = move_views([same_a, 7, same_b, other, torch.empty(0)], lambda t: t.clone())
    assert moved[0] is moved[2] and moved[0] is not same_a and moved[1] == 7
    assert moved[3] is not moved[0]
    assert torch.equal(moved[0], same_a) and torch.equal(moved[3], other) and moved[4].numel() == 0


def test_a_table_key_is_made_from_shapes_and_scalars_and_refused_for_other_values():
    model = TinyVideoDiT().eval()
    runner = rc.stream(ExportedHybrid(model, *tiny_inputs(model, 4)))
    x, t = tiny_inputs(model, 5, seed=1)
    program, flat = runner.program(x, t), runner.plan(x, t).flat
    key = table_key(program, flat)
    assert key is not None and key == table_key(program, [f * 2 for f in flat])  # values do not count
    assert key != table_key(program, [flat[0][:, :, :4], flat[1][:, :4]])          # shapes do
    read = [i for i, node in enumerate(program.table_module.graph.find_nodes(op="placeholder")) if node.users]
    assert read  # the frame count comes from an input's shape
    for i, value, want_key in [(read[0], 3, True), (read[0], None, True), (read[0], [1, 2], False)]:
        other = list(flat)
        other[i] = value
        assert (table_key(program, other) is not None) == want_key  # a list: equality a key cannot promise
    assert table_key(program, [*flat[:read[0]], 3, *flat[read[0] + 1:]]) != \
        table_key(program, [*flat[:read[0]], 4, *flat[read[0] + 1:]])


def test_a_table_key_reads_only_the_inputs_the_tables_are_made_from():
    from rehyat_compile.zoo import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=5)
    runner = rc.stream(rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1), cuda_graphs=False)
    program = runner.program(*args, **kwargs)
    text = kwargs["encoder_hidden_states"]
    shorter = dict(kwargs, encoder_hidden_states=text[:, : text.shape[1] // 2])  # a negative prompt of another length
    key = table_key(program, runner.plan(*args, **kwargs).flat)
    assert key is not None and key == table_key(program, runner.plan(*args, **shorter).flat)
    assert key != table_key(program, runner.plan(args[0][:, :, :3], **kwargs).flat)  # the latents' frames are read
