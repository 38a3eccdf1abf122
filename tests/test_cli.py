"""The `rehyat-compile` command: every verb on the tiny Wan2.1 preset, --json parsed back, errors."""
import json
import subprocess
import sys

import pytest

from rehyat_compile.cli import build_parser, main

VERBS = ("inspect", "transform", "cost", "build", "distill", "demo")


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1])


def test_help_of_the_command_and_of_every_verb():
    result = subprocess.run([sys.executable, "-m", "rehyat_compile.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and all(verb in result.stdout for verb in VERBS)
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([verb, "--help"])
        assert exit_.value.code == 0


def test_inspect_json_lists_the_sites(capsys):
    code, report = run_json(capsys, "inspect", "--preset", "wan2.1-tiny")
    assert code == 0
    kinds = {s["name"]: s["kind"] for s in report["sites"]}
    assert kinds == {"blocks.0.attn1": "self", "blocks.0.attn2": "cross", "blocks.1.attn1": "self",
                     "blocks.1.attn2": "cross"}


def test_transform_json_and_saved_weights(capsys, tmp_path):
    out = tmp_path / "hybrid.safetensors"
    code, result = run_json(capsys, "transform", "--preset", "wan2.1-tiny", "--chunk-frames", "2", "--out", str(out))
    assert code == 0 and result["converted"] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert result["trainable_parameters"] > 0 and out.exists()


def test_cost_json_degrees_and_plot(capsys, tmp_path):
    plot = tmp_path / "cost.png"
    code, result = run_json(capsys, "cost", "--preset", "wan2.1-tiny", "--chunk-frames", "2", "--plot", str(plot))
    assert code == 0
    assert (result["original_degree"], result["converted_degree"], result["linear"]) == (2, 1, True)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert all(r["original_flops"] > r["converted_flops"] for r in result["rows"] if r["T"] >= 21)


def test_distill_json_reports_every_site(capsys):
    code, result = run_json(capsys, "distill", "--preset", "wan2.1-tiny", "--chunk-frames", "1",
                            "--overlap-frames", "0", "--steps", "5", "--batches", "2")
    assert code == 0 and set(result["per_layer"]) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert result["model_error_after"] >= 0


@pytest.mark.slow
def test_build_json_manifest_for_cpu(capsys, tmp_path):
    pytest.importorskip("tvm")
    code, result = run_json(capsys, "build", "--preset", "wan2.1-tiny", "--chunk-frames", "2", "--target", "cpu",
                            "--out-dir", str(tmp_path / "cpu"))
    assert code == 0 and result["manifest"]["target"] == "cpu"
    assert all(len(digest) == 64 for digest in result["manifest"]["files"].values())


@pytest.mark.parametrize("argv,words", [
    (["inspect", "--preset", "no-such-model"], "unknown preset"),
    (["inspect"], "name a model"),
    (["inspect", "not_a_factory"], "module:factory"),
    (["inspect", "no_such_module_xyz:make"], "cannot load"),
    (["inspect", "diffusers:WanTransformer3DModel"], "--config"),
    (["build", "--preset", "wan2.1-tiny", "--target", "tpu", "--out-dir", "x"], "cpu"),
    (["build", "--preset", "wan2.1-tiny", "--target", "qnn-htp", "--soc", "sm9999", "--out-dir", "x"], "sm8650"),
])
def test_errors_say_what_to_do_next(capsys, argv, words):
    code, result = run_json(capsys, *argv)
    assert code == 2 and words in result["error"]


def test_diffusers_class_from_config(capsys, tmp_path):
    from rehyat_compile.zoo import make_wan_t2v
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(make_wan_t2v()[0].config)))
    code, report = run_json(capsys, "inspect", "diffusers:WanTransformer3DModel", "--config", str(config))
    assert code == 0 and sum(s["rewritable"] for s in report["sites"]) == 2


@pytest.mark.slow
def test_demo_json_runs_every_stage_and_writes_its_plot(capsys, tmp_path):
    # The main job end to end (about 3 min on 2 idle cores): every number in the summary is measured.
    code, summary = run_json(capsys, "demo", "--out", str(tmp_path / "demo"))
    assert code == 0
    assert summary["exact_rel_error"] <= 1e-4 and summary["stream_rel_error"] <= 1e-4
    assert summary["distilled_rel_error"] < summary["converted_rel_error"]
    assert (summary["cost_degree_original"], summary["cost_degree_converted"]) == (2, 1)
    assert (tmp_path / "demo" / "cost.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "demo" / "samples.gif").read_bytes()[:3] == b"GIF"
    assert (tmp_path / "demo" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    val = summary["fidelity"]["val_loss"]  # the trained teacher is far better than its crude conversion
    assert val["teacher"] < val["distilled"] < val["converted"]
    assert summary["fidelity"]["sample_rmse"]["distilled"] < summary["fidelity"]["sample_rmse"]["converted"]
    builds = summary["builds"]
    assert "runs here" in builds["cpu"] and "DIFFER" not in builds["adreno"]
    assert "match x86 on qemu-hexagon v66" in builds["hexagon"] or "not run" in builds["hexagon"]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["builds"] == builds
