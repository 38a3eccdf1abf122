"""rc.cost / rc.check_linear: symbolic cost in T (latent frames) agrees with FlopCounterMode on real
runs, is quadratic for softmax attention, linear for hybrid attention, constant for a step graph."""
from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rehyat_compile as rc

HEADS, HEAD_DIM, CHANNELS, TPF = 2, 8, 16, 16  # 4x4 latent frame = 16 tokens


class VideoAttention(nn.Module):
    """[B, C, T, H, W] video -> frame-major tokens -> one self-attention layer -> same shape.

    hybrid=None: softmax attention (sdpa); else (chunk_frames, overlap_frames) of rc.hybrid_attention.
    """

    def __init__(self, hybrid=None):
        super().__init__()
        self.qkv = nn.Linear(CHANNELS, 3 * CHANNELS)
        self.out = nn.Linear(CHANNELS, CHANNELS)
        self.hybrid = hybrid
        if hybrid is not None:
            self.phi_q = rc.FeatureMap(HEADS, HEAD_DIM, feature_dim=8)
            self.phi_k = rc.FeatureMap(HEADS, HEAD_DIM, feature_dim=8)

    def forward(self, video):
        b, c, t, h, w = video.shape
        x = video.flatten(2).transpose(1, 2)  # [B, T*H*W, C]
        q, k, v = (y.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        if self.hybrid is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = rc.hybrid_attention(q, k, v, self.phi_q(q), self.phi_k(k), tokens_per_frame=h * w,
                                    chunk_frames=self.hybrid[0], overlap_frames=self.hybrid[1])
        y = self.out(o.transpose(1, 2).flatten(2))
        return video + y.transpose(1, 2).reshape(b, c, t, h, w)


class HybridStep(nn.Module):
    """One chunk of a streamed hybrid layer with its state as explicit inputs and outputs."""

    def __init__(self, chunk_frames, overlap_frames):
        super().__init__()
        self.layer = VideoAttention((chunk_frames, overlap_frames))
        self.chunk_frames, self.overlap_frames = chunk_frames, overlap_frames

    def forward(self, chunk, s, z, k_overlap, v_overlap, fk_overlap, overlap_valid):
        b, c, t, h, w = chunk.shape
        layer = self.layer
        x = chunk.flatten(2).transpose(1, 2)
        q, k, v = (y.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for y in layer.qkv(x).chunk(3, dim=-1))
        state = rc.HybridState(s, z, k_overlap, v_overlap, fk_overlap, overlap_valid)
        o, new = rc.hybrid_attention_step(q, k, v, layer.phi_q(q), layer.phi_k(k), state, tokens_per_frame=h * w,
                                          chunk_frames=self.chunk_frames, overlap_frames=self.overlap_frames)
        y = layer.out(o.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(b, c, t, h, w)
        return (chunk + y,) + tuple(new)


def video(frames):
    return torch.randn(1, CHANNELS, frames, 4, 4)


def tiny_wan(layers=2):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                 rope_max_seq_len=64).eval()


def wan_inputs(frames):
    return dict(hidden_states=torch.randn(1, 4, frames, 8, 8), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, 16), return_dict=False)


def counted_flops(model, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def wan_cost():
    model = tiny_wan()
    return model, rc.cost(model, kwargs=wan_inputs(3))


def test_original_wan_is_quadratic_and_rejected(wan_cost):
    _, cost = wan_cost
    assert cost.degree("flops") == 2
    assert cost.degree("flops_elementwise") == 2
    with pytest.raises(rc.ComplexityError) as err:
        rc.check_linear(cost)
    offenders = err.value.nodes
    assert offenders and all("scaled_dot_product_attention" in cost.by_node[n].target for n in offenders)
    assert {cost.by_node[n].site for n in offenders} == {"blocks.0.attn1", "blocks.1.attn1"}
    assert "blocks.0.attn1" in str(err.value)


@pytest.mark.parametrize("frames", [3, 7])
def test_wan_flops_equal_flop_counter(wan_cost, frames):
    model, cost = wan_cost
    assert cost.evaluate(T=frames)["flops"] == counted_flops(model, **wan_inputs(frames))


def test_wan_sites_split_self_and_cross_attention(wan_cost):
    _, cost = wan_cost
    assert set(cost.by_site) == {f"blocks.{i}.attn{j}" for i in (0, 1) for j in (1, 2)}
    assert cost.degree(cost.by_site["blocks.0.attn1"].flops) == 2
    assert cost.degree(cost.by_site["blocks.0.attn2"].flops) == 1  # cross-attention to fixed text
    assert sum(c.flops for c in cost.by_node.values()) == cost.flops


@pytest.fixture(scope="module")
def converted_wan_cost():
    from models import make_wan_t2v
    model, args, kwargs = make_wan_t2v(5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    return hybrid, rc.cost(hybrid, args, kwargs)


def test_converted_wan_is_linear_and_accepted(converted_wan_cost):
    hybrid, cost = converted_wan_cost
    assert cost.degree("flops") == 1 and cost.degree("flops_elementwise") == 1
    assert rc.check_linear(cost) is cost
    hybrid_nodes = [c for c in cost.by_node.values() if "hybrid_attention" in c.target]
    assert sorted(c.site for c in hybrid_nodes) == sorted(s.name for s in hybrid.sites)
    phi = [c for c in cost.by_node.values() if "phi_" in c.target]
    assert len(phi) == 2 * len(hybrid.sites) and all(c.site in cost.by_site and c.flops != 0 for c in phi)


@pytest.mark.parametrize("frames", [5, 9])
def test_converted_wan_flops_equal_flop_counter(converted_wan_cost, frames):
    from models import make_wan_t2v
    hybrid, cost = converted_wan_cost
    _, args, kwargs = make_wan_t2v(frames)
    assert cost.evaluate(T=frames)["flops"] == counted_flops(hybrid, *args, **kwargs)


@pytest.mark.parametrize("chunk_frames, overlap_frames", [(1, 0), (2, 1), (3, 1)])
def test_hybrid_layer_is_linear_and_matches_flop_counter(chunk_frames, overlap_frames):
    torch.manual_seed(0)
    model = VideoAttention((chunk_frames, overlap_frames)).eval()
    cost = rc.cost(model, (video(4),))
    assert cost.degree("flops") == 1 and cost.degree("bytes") == 1 and cost.degree("peak_memory") == 1
    assert rc.check_linear(cost) is cost
    hybrid_nodes = [c for c in cost.by_node.values() if "hybrid_attention" in c.target]
    assert len(hybrid_nodes) == 1
    for frames in (5, 8):
        assert cost.evaluate(T=frames)["flops"] == counted_flops(model, video(frames))


def test_hybrid_op_cost_is_its_registered_formula():
    model = VideoAttention((2, 1)).eval()
    cost = rc.cost(model, (video(4),))
    (node,) = [c for c in cost.by_node.values() if "hybrid_attention" in c.target]
    n = TPF * cost.T
    assert sympy.simplify(node.flops - rc.hybrid_attention_flops(1, HEADS, n, HEAD_DIM, 8, tokens_per_frame=TPF,
                                                                 chunk_frames=2, overlap_frames=1)) == 0


def test_softmax_layer_is_quadratic_and_matches_flop_counter():
    torch.manual_seed(0)
    model = VideoAttention().eval()
    cost = rc.cost(model, (video(3),))
    assert cost.degree("flops") == 2
    for frames in (4, 9):
        assert cost.evaluate(T=frames)["flops"] == counted_flops(model, video(frames))


def test_math_attention_materialises_scores():
    model = VideoAttention().eval()
    fused = rc.cost(model, (video(3),))
    math = rc.cost(model, (video(3),), attention="math")
    assert math.flops == fused.flops  # the same two matmuls either way
    assert fused.degree("bytes") == 1 and fused.degree("peak_memory") == 1
    assert math.degree("bytes") == 2 and math.degree("peak_memory") == 2
    with pytest.raises(rc.ComplexityError, match="peak_memory ~ T\\^2"):
        rc.check_linear(math)


def step_inputs(chunk_frames, overlap_frames, features=8):
    n_overlap = overlap_frames * TPF
    return (video(chunk_frames), torch.zeros(1, HEADS, features, HEAD_DIM), torch.zeros(1, HEADS, features),
            torch.randn(1, HEADS, n_overlap, HEAD_DIM), torch.randn(1, HEADS, n_overlap, HEAD_DIM),
            torch.rand(1, HEADS, n_overlap, features), torch.ones(n_overlap, dtype=torch.bool))


def test_step_graph_cost_and_memory_are_constant_per_chunk():
    torch.manual_seed(0)
    step = HybridStep(3, 1).eval()
    args = step_inputs(3, 1)
    cost = rc.cost(step, args, chunk_frames=3)
    assert cost.degree("peak_memory") == 0
    assert all(cost.degree(cost.per_call(m)) == 0 for m in ("flops", "bytes", "flops_elementwise"))
    assert cost.degree("flops") == 1  # chunks = ceiling(T / 3)
    assert cost.per_call("flops") == counted_flops(step, *args)
    assert cost.evaluate(T=7)["flops"] == 3 * counted_flops(step, *args)
    rc.check_linear(cost)


def test_streamed_dit_step_graph_is_constant_per_chunk():
    """The real step program of a converted diffusers Wan2.1 (rc.stream): per-chunk FLOPs, bytes
    and peak memory do not depend on T; totals grow linearly."""
    from models import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    step, example = rc.stream(hybrid).step_module(*args, **kwargs)
    cost = rc.cost(step, example, chunk_frames=2)
    assert cost.degree("peak_memory") == 0
    assert all(cost.degree(cost.per_call(m)) == 0 for m in ("flops", "bytes", "flops_elementwise"))
    assert cost.degree("flops") == 1
    rc.check_linear(cost)


def test_step_graph_costs_less_memory_than_whole_video():
    step = HybridStep(2, 1).eval()
    whole = rc.cost(VideoAttention((2, 1)).eval(), (video(4),))
    streamed = rc.cost(step, step_inputs(2, 1), chunk_frames=2)
    assert streamed.evaluate(T=64)["peak_memory"] < whole.evaluate(T=64)["peak_memory"] / 10


def test_exported_program_is_accepted():
    model = VideoAttention().eval()
    ep = torch.export.export(model, (video(3),), dynamic_shapes=({2: torch.export.Dim("frames", min=2)},))
    assert rc.cost(ep).flops == rc.cost(model, (video(3),)).flops


def test_frames_given_as_argument_and_axis():
    model = VideoAttention().eval()
    assert rc.cost(model, (video(3),), frames=(0, 2)).flops == rc.cost(model, (video(3),)).flops


def test_no_frame_axis_is_a_clear_error():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no frame axis.*frames=.*chunk_frames"):
        rc.cost(model, (torch.randn(3, 4),))


def test_single_frame_example_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 frames"):
        rc.cost(VideoAttention(), (video(1),))


def test_model_that_does_not_export_is_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0]  # output size depends on values

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(rc.ConversionError, match="cannot be exported"):
        rc.cost(Branchy(), (video(3),))
    with pytest.raises(ValueError, match="data-dependent output size"):
        rc.cost(DataDependent(), (video(3),))


def test_bad_arguments_name_the_argument():
    model = VideoAttention()
    with pytest.raises(TypeError, match="model"):
        rc.cost(object(), (video(3),))
    with pytest.raises(ValueError, match="attention"):
        rc.cost(model, (video(3),), attention="flash")
    with pytest.raises(ValueError, match="chunk_frames"):
        rc.cost(model, (video(3),), chunk_frames=0)
    with pytest.raises(ValueError, match="not both"):
        rc.cost(model, (video(3),), frames=2, chunk_frames=2)
    with pytest.raises(ValueError, match="no input named"):
        rc.cost(model, (video(3),), frames=("x", 2))
    with pytest.raises(TypeError, match="check_linear"):
        rc.check_linear({"flops": 1})


def test_evaluate_and_to_dict():
    cost = rc.cost(VideoAttention().eval(), (video(3),))
    values = cost.evaluate(T=5)
    assert set(values) == {"flops", "flops_elementwise", "bytes", "peak_memory"}
    assert all(isinstance(v, int) and v > 0 for v in values.values())
    data = cost.to_dict()
    assert data["degree"]["flops"] == 2 and data["symbol"] == "T"
    with pytest.raises(ValueError, match="T must be"):
        cost.evaluate(T=0)
    with pytest.raises(ValueError, match="metric"):
        cost.degree("latency")


def test_unfused_hybrid_layer_stays_linear():
    cost = rc.cost(VideoAttention((2, 1)).eval(), (video(4),), attention="math")
    assert cost.degree("flops") == 1 and cost.degree("bytes") == 1 and cost.degree("peak_memory") == 1
    rc.check_linear(cost)


def test_portable_attention_costs_the_prefix_sums_as_a_triangular_matmul():
    # attention="portable": the AOT backends' decomposition; the chunk prefix is a [nC, nC] lower-triangular
    # matmul (cumsum in "math"): more FLOPs, and formally quadratic in the chunk count, with a coefficient
    # so small that bytes stay within 4% of "math" at 200 latent frames (measured 0.8% at 6, 3.6% at 200)
    model = VideoAttention((2, 1)).eval()
    math = rc.cost(model, (video(6),), attention="math")
    portable = rc.cost(model, (video(6),), attention="portable")
    assert math.degree("bytes") == 1 and portable.degree("bytes") == 2
    for frames in (6, 200):
        assert portable.evaluate(T=frames)["flops"] > math.evaluate(T=frames)["flops"]
        assert 1 < portable.evaluate(T=frames)["bytes"] / math.evaluate(T=frames)["bytes"] < 1.04
    with pytest.raises(ValueError, match="portable"):
        rc.cost(model, (video(6),), attention="flash")


def test_graph_specialised_on_the_example_length_is_an_error():
    # one chunk in the example: the hybrid op's decomposition guards on it, capping the valid T
    with pytest.raises(rc.ConversionError, match="specialises on the example"):
        rc.cost(VideoAttention((5, 1)).eval(), (video(3),), attention="math")
    cost = rc.cost(VideoAttention((5, 1)).eval(), (video(12),), attention="math")
    assert cost.frames_range[1] is None and cost.degree("bytes") == 1
    with pytest.raises(ValueError, match="outside the frame counts"):
        cost.evaluate(T=cost.frames_range[0] - 1)


class ScaleAddOne(nn.Module):
    def forward(self, x):
        a = x * 2              # new buffer; x dies here
        b = a.view(-1)         # a view: no new memory, keeps a alive
        return (b + 1).view(1, CHANNELS, -1, 4, 4)  # constant sizes: x is not used again


def test_peak_memory_follows_storages_not_views():
    cost = rc.cost(ScaleAddOne(), (video(3),))
    frame_bytes = 4 * CHANNELS * TPF
    assert sympy.expand(cost.peak_memory - 2 * frame_bytes * cost.T) == 0  # two buffers alive at once
    assert cost.by_node["view"].bytes == 0


def test_degree_of_floors_and_min_from_the_hybrid_formula():
    from rehyat_compile.symbolic import T, degree, upper_envelope
    flops = rc.hybrid_attention_flops(1, 2, 16 * T + 3, 8, 4, tokens_per_frame=16, chunk_frames=3,
                                      overlap_frames=1, extra_before=3)
    assert degree(flops) == 1
    assert degree(sympy.Max(T**2, 5 * T)) == 2 and degree(sympy.Min(T**2, 5 * T)) == 1
    assert degree(sympy.Integer(7)) == 0
    assert upper_envelope([T, 2 * T, 3 * T + 1, T**2]) == [3 * T + 1, T**2]


from rehyat_compile.zoo import WAN2_1_1_3B_CONFIG as WAN_1_3B  # noqa: E402


def meta_wan(num_layers):
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        return WanTransformer3DModel(**{**WAN_1_3B, "num_layers": num_layers}).eval()


def meta_wan_inputs(frames):
    with torch.device("meta"):
        return dict(hidden_states=torch.empty(1, 16, frames, 60, 104), timestep=torch.zeros(1, dtype=torch.long),
                    encoder_hidden_states=torch.empty(1, 512, 4096), return_dict=False)


@pytest.mark.slow
def test_paper_width_wan_on_meta_matches_flop_counter():
    model = meta_wan(2)  # Wan2.1-1.3B width and 480x832, two blocks: no weights anywhere
    cost = rc.cost(model, kwargs=meta_wan_inputs(3))
    assert cost.degree("flops") == 2
    for frames in (5, 21):
        assert cost.evaluate(T=frames)["flops"] == counted_flops(model, **meta_wan_inputs(frames))
    tokens = 21 * 30 * 52
    attention = sum(c.flops for c in cost.by_node.values() if c.site and c.site.endswith("attn1")
                    and "attention" in c.target)
    assert attention.subs(cost.T, 21) == 2 * 4 * tokens**2 * 1536  # 4 N^2 D per block, D = 12 heads x 128


def test_asymptotic_form_of_hybrid_cost_is_linear_polynomial():
    cost = rc.cost(VideoAttention((3, 1)).eval(), (video(4),))
    growth = cost.asymptotic("flops")
    assert sympy.Poly(growth, cost.T).degree() == 1
    assert "~" in str(cost)
    big = 3000  # exact and asymptotic forms agree to within the bounded floor terms
    assert abs(cost.evaluate(T=big)["flops"] - growth.subs(cost.T, big)) < 1e-3 * growth.subs(cost.T, big)
