"""FeatureMap: shapes, non-negativity, the per-part powers, and clear errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import rehyat_compile as rc


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.sampled_from([4, 8]), st.integers(1, 3), st.integers(1, 4),
       st.sampled_from(["softplus", "relu"]))
def test_features_are_non_negative_with_requested_width(heads, head_dim, degree, width, positive):
    phi = rc.FeatureMap(heads, head_dim, feature_dim=degree * width, degree=degree, positive=positive)
    out = phi(torch.randn(2, heads, 7, head_dim) * 5)
    assert out.shape == (2, heads, 7, degree * width)
    assert (out >= 0).all()


def test_part_p_is_raised_to_power_p():
    phi = rc.FeatureMap(1, 4, feature_dim=6, degree=3, activation="identity")
    x = torch.randn(1, 1, 5, 4)
    u = torch.nn.functional.softplus(x @ phi.w1 @ phi.w2 + phi.b1 @ phi.w2 + phi.b2)
    expected = torch.cat([u[..., 0:2], u[..., 2:4] ** 2, u[..., 4:6] ** 3], dim=-1)
    torch.testing.assert_close(phi(x), expected)


def test_heads_have_independent_weights():
    phi = rc.FeatureMap(2, 4, feature_dim=4)
    x = torch.randn(1, 1, 3, 4).expand(1, 2, 3, 4)
    out = phi(x)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_half_input_with_fp32_weights_returns_fp32():
    phi = rc.FeatureMap(2, 4, feature_dim=4)
    assert phi(torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)).dtype == torch.float32
    assert phi.to(torch.bfloat16)(torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,word", [
    (dict(feature_dim=5, degree=2), "multiple of degree"),
    (dict(degree=0), "degree"),
    (dict(hidden=0), "hidden"),
    (dict(activation="tanhh"), "activation"),
    (dict(positive="abs"), "positive"),
])
def test_bad_configuration_names_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        rc.FeatureMap(2, 4, **kwargs)


def test_wrong_input_shape_is_reported():
    with pytest.raises(ValueError, match=r"H=2"):
        rc.FeatureMap(2, 4)(torch.randn(1, 3, 5, 4))


def test_custom_op_is_the_modules_function_and_passes_opcheck():
    from rehyat_compile.feature_map import FeatureMap  # noqa: F401  (registers rehyat::feature_map)
    torch.manual_seed(0)
    phi = rc.FeatureMap(2, 8, feature_dim=6, hidden=5, degree=3, activation="silu", positive="relu")
    x = torch.randn(2, 2, 7, 8)
    args = (x, phi.w1, phi.b1, phi.w2, phi.b2, phi.activation, phi.positive, phi.degree)
    with torch.no_grad():
        assert torch.equal(torch.ops.rehyat.feature_map(*args), phi.forward_torch(x))
    torch.library.opcheck(torch.ops.rehyat.feature_map.default, tuple(a.detach() if torch.is_tensor(a) else a
                                                                      for a in args),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_feature_map_is_one_node_with_the_fused_kernel():
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm

    phi = rc.FeatureMap(12, 128, 64).to("cuda", torch.bfloat16)
    x = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    with torch.no_grad():
        got = torch.compile(phi, backend=record, fullgraph=True)(x)
        ref = phi.forward_torch(x)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("rehyat.feature_map" in t for t in targets) and not any("bmm" in t or "matmul" in t for t in targets)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
