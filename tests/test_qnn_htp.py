"""backends/qnn.py and backends/onnx.py: the converted tiny Wan2.1 (5 latent frames, Tc=2, To=1)
built for Qualcomm HTP v73 / v75 / v79 (SM8550 / SM8650 / SM8750) in fp16 and w8a16 and run on QNN's
HTP simulator with CPU fallback disabled, against fp32 PyTorch; the ONNX target on ONNX Runtime's
CPU provider; bad options and an op HTP cannot take reported by name.

Tolerances (max |error|; outputs up to ~2.3, linear state s up to ~2.6, z up to ~5.5). Measured on these
tests' inputs (the build's example, which w8a16 is also calibrated on), the same on every SoC:
fp16 whole graph 0.0195, step chunks 0 / 1 0.019 / 0.019, state s / z 0.022 / 0.016 -> FP16_TOL 0.05;
w8a16 whole graph 0.144, step chunks 0.012 / 0.012, state s 0.039 / 0.093, z 0.066 / 0.162 -> W8A16_TOL 0.25
(16-bit activations, 8-bit weights). On held-out inputs (benchmarks/qnn_htp_accuracy.py,
benchmarks/results/qnn_htp_accuracy.json) fp16 is the same and w8a16 reaches 0.11 (outputs) and 0.29 (s).
"""
from __future__ import annotations

import json

import pytest
import torch

import rehyat_compile as rc

pytest.importorskip("onnxruntime_qnn")
pytest.importorskip("diffusers")

from models import converted_wan_t2v  # noqa: E402
from rehyat_compile.backends import qnn  # noqa: E402
from rehyat_compile.backends.onnx import op_counts  # noqa: E402
from rehyat_compile.backends.portable import tensor_leaves  # noqa: E402
from rehyat_compile.backends.targets import HTP_SOCS  # noqa: E402

FP16_TOL = 0.05
W8A16_TOL = 0.25
TOL = {"fp16": FP16_TOL, "w8a16": W8A16_TOL}
ALL_SOCS = {"soc": tuple(HTP_SOCS)}
ONNX_TOL = 1e-4  # ORT CPU fp32 vs eager: measured 7.2e-7 (whole and streamed); as the other fp32 targets


@pytest.fixture(scope="module")
def wan():
    hybrid, args, kwargs = converted_wan_t2v()
    with torch.no_grad():
        ref = hybrid(*args, **kwargs)[0]
    return hybrid, args, kwargs, ref


def _max_error(got, want) -> float:
    return (got.float() - want.float()).abs().max().item()


def _per_soc(art, entry: str):
    """(soc name, runner on the HTP simulator) for every SoC the artifact was built for."""
    files = art.manifest["entries"][entry]["files"]
    return [(soc.name, qnn.load_entry(art.out_dir, art.target, files, soc=soc.name)) for soc in qnn.socs_of(art.target)]


def test_unknown_soc_is_refused_listing_the_valid_ones(wan, tmp_path):
    hybrid, args, kwargs, _ = wan
    with pytest.raises(ValueError) as err:
        rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=tmp_path / "x", target_options={"soc": "sm8450"})
    assert all(name in str(err.value) for name in HTP_SOCS) and "sm8450" in str(err.value)
    with pytest.raises(ValueError, match="w8a16"):
        rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=tmp_path / "y", target_options={"precision": "int4"})
    assert not (tmp_path / "x").exists()


def test_an_op_htp_cannot_take_is_named_not_run_on_the_cpu(tmp_path):
    class Xor(torch.nn.Module):
        def forward(self, x):
            return (x * 10).int().bitwise_xor(torch.tensor(3, dtype=torch.int32)).float() + x

    with pytest.raises(rc.ConversionError, match=r"node_bitwise_xor \(BitwiseXor\)"):
        rc.build(Xor(), (torch.randn(2, 8),), target="qnn-htp", out_dir=tmp_path / "xor",
                 target_options={"soc": "sm8550"})
    assert not (tmp_path / "xor").exists()


def test_a_tensor_above_htp_rank_is_named(tmp_path):
    class Rank6(torch.nn.Module):
        def forward(self, x):
            return (x * 2).sum(-1)

    with pytest.raises(rc.ConversionError, match=r"rank <= 5.*mul"):
        rc.build(Rank6(), (torch.randn(1, 2, 2, 2, 2, 3),), target="qnn-htp", out_dir=tmp_path / "r6")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
def test_whole_graph_runs_on_htp_v73_v75_v79_within_tolerance(wan, tmp_path, precision):
    hybrid, args, kwargs, ref = wan
    art = rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=tmp_path / precision,
                   target_options={**ALL_SOCS, "precision": precision})
    assert art.runnable and art.emulated == qnn.SIMULATOR
    files = art.manifest["entries"]["main"]["files"]
    for soc in HTP_SOCS:
        assert {f"{soc}.context", f"{soc}.binary"} <= set(files)
    assert set(art.manifest["files"]) == {*files.values(), "weights.safetensors"}  # every file has a sha256
    assert ("qdq" in files) == (precision == "w8a16")
    assert "Gather" not in op_counts(art.out_dir / files["onnx"])  # the hybrid op's decomposition has none
    torch.testing.assert_close(art(*args, **kwargs)[0], ref, atol=TOL[precision], rtol=0)  # rc.load's default SoC
    errors = {soc: _max_error(torch.from_numpy(run(list(tensor_leaves(args, kwargs)))[0]), ref)
              for soc, run in _per_soc(art, "main")}
    assert all(e <= TOL[precision] for e in errors.values()), errors
    assert max(errors.values()) > 1e-5  # it really ran in reduced precision (not a CPU fp32 fallback)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
def test_step_graph_carries_its_state_through_two_chunks_on_every_soc(wan, tmp_path, precision):
    hybrid, args, kwargs, ref = wan
    art = rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=tmp_path / precision, streaming=True,
                   target_options={**ALL_SOCS, "precision": precision})
    step = art.manifest["entries"]["step"]
    n_state = sum(s["role"] == "state" for s in step["outputs"])
    linear = [i for i, s in enumerate(step["outputs"]) if s["name"].endswith((".s", ".z"))]
    module, _ = rc.stream(hybrid).step_module(*args, **kwargs)
    calls = rc.stream(hybrid).step_inputs(*args, **kwargs)[:2]
    for soc, run in _per_soc(art, "step"):
        got_state = want_state = None
        for _, inputs in calls:
            chunk = list(inputs[:len(inputs) - n_state])
            got = [torch.from_numpy(x) for x in run(chunk + list(got_state or inputs[-n_state:]))]
            with torch.no_grad():
                want = list(module(*chunk, *(want_state or inputs[-n_state:])))
            assert _max_error(got[0], want[0]) <= TOL[precision], (soc, precision)
            assert max(_max_error(got[i], want[i]) for i in linear) <= TOL[precision], (soc, "state")
            got_state, want_state = got[len(got) - n_state:], want[len(want) - n_state:]
        assert max(want_state[i - len(want) + n_state].abs().max().item() for i in linear) > 0.1  # a real state
    if precision == "fp16":  # the whole video through rc.load's stream (step, step, step_last) on the default SoC
        with torch.no_grad():
            streamed = rc.stream(hybrid)(*args, **kwargs)[0]
        torch.testing.assert_close(rc.load(art.out_dir).stream(*args, **kwargs)[0], streamed, atol=FP16_TOL, rtol=0)


@pytest.mark.slow
def test_original_unconverted_model_builds_and_runs_on_htp(tmp_path):
    from rehyat_compile.zoo import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=5)
    with torch.no_grad():
        ref = model(*args, **kwargs)[0]
    art = rc.build(model, args, kwargs, target="qnn-htp", out_dir=tmp_path / "orig", target_options={"soc": "sm8650"})
    torch.testing.assert_close(art(*args, **kwargs)[0], ref, atol=FP16_TOL, rtol=0)


@pytest.mark.slow
def test_onnx_target_whole_and_step_graphs_run_on_ort_cpu(wan, tmp_path):
    hybrid, args, kwargs, ref = wan
    whole = rc.build(hybrid, args, kwargs, target="onnx", out_dir=tmp_path / "whole")
    torch.testing.assert_close(whole(*args, **kwargs)[0], ref, atol=ONNX_TOL, rtol=ONNX_TOL)
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert manifest["target"] == "onnx" and "onnxruntime" in manifest["versions"]
    stepped = rc.build(hybrid, args, kwargs, target="onnx", out_dir=tmp_path / "step", streaming=True)
    with torch.no_grad():
        streamed = rc.stream(hybrid)(*args, **kwargs)[0]
    torch.testing.assert_close(stepped.stream(*args, **kwargs)[0], streamed, atol=ONNX_TOL, rtol=ONNX_TOL)
