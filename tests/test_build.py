"""rc.build / rc.load: artifacts, manifest, checksums, and CPU builds matching PyTorch."""
from __future__ import annotations

import json

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.backends.targets import BACKENDS, TARGETS

from blocks import HybridBlockStep

pytest.importorskip("tvm")

CPU_TOL = 1e-5  # fp32 through LLVM vs PyTorch eager: reassociation only


@pytest.fixture(scope="module")
def cpu_artifact(block_x, tmp_path_factory):
    block, x, _ = block_x
    return rc.build(block, (x,), target="cpu", backend="tvm", out_dir=tmp_path_factory.mktemp("cpu") / "art")


def test_tvm_cpu_build_matches_pytorch(block_x, cpu_artifact):
    _, x, ref = block_x
    assert cpu_artifact.runnable
    torch.testing.assert_close(cpu_artifact(x), ref, atol=CPU_TOL, rtol=CPU_TOL)


def test_manifest_records_target_specs_versions_and_checksums(cpu_artifact):
    manifest = json.loads((cpu_artifact.out_dir / "manifest.json").read_text())
    assert manifest["target"] == "cpu" and manifest["backend"] == "tvm"
    assert {"tvm", "torch", "rehyat_compile"} <= set(manifest["versions"])
    (entry,) = manifest["entries"].values()
    assert entry["inputs"] == [{"name": "x", "shape": [1, 20, 16], "dtype": "float32", "role": "input"}]
    assert entry["outputs"][0]["shape"] == [1, 20, 16]
    on_disk = {p.name for p in cpu_artifact.out_dir.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and all(len(d) == 64 for d in manifest["files"].values())
    assert manifest["cost"]


def _copy(artifact, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(artifact.out_dir, dst)
    return dst


def test_tampered_library_is_refused(cpu_artifact, tmp_path):
    dst = _copy(cpu_artifact, tmp_path)
    lib = dst / "main.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(rc.ArtifactError, match="tampered.*main.so"):
        rc.load(dst)


def test_incomplete_artifact_is_refused(cpu_artifact, tmp_path):
    dst = _copy(cpu_artifact, tmp_path)
    (dst / "weights.safetensors").unlink()
    with pytest.raises(rc.ArtifactError, match="incomplete.*weights.safetensors"):
        rc.load(dst)


def test_edited_manifest_is_refused(cpu_artifact, tmp_path):
    dst = _copy(cpu_artifact, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["target"] = "aarch64"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(rc.ArtifactError, match="edited"):
        rc.load(dst)


def test_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(rc.ArtifactError, match="manifest.json is missing"):
        rc.load(tmp_path)


def test_unknown_target_lists_valid_targets(block_x, tmp_path):
    block, x, _ = block_x
    with pytest.raises(ValueError) as err:
        rc.build(block, (x,), target="tpu", out_dir=tmp_path)
    assert all(name in str(err.value) for name in TARGETS)


def test_unknown_backend_lists_valid_backends(block_x, tmp_path):
    block, x, _ = block_x
    with pytest.raises(ValueError) as err:
        rc.build(block, (x,), target="cpu", backend="xla", out_dir=tmp_path)
    assert all(name in str(err.value) for name in BACKENDS)


def test_backend_that_cannot_reach_target_is_named(block_x, tmp_path):
    block, x, _ = block_x
    with pytest.raises(ValueError, match="'hexagon' is built by backend 'tvm'"):
        rc.build(block, (x,), target="hexagon", backend="mlir", out_dir=tmp_path)


def test_streaming_without_step_module_is_rejected(block_x, tmp_path):
    block, x, _ = block_x
    with pytest.raises(ValueError, match="state_names"):
        rc.build(block, (x,), target="cpu", out_dir=tmp_path, streaming=True)


def test_streaming_cpu_build_runs_chunk_by_chunk_like_the_parallel_model(block_x, tmp_path):
    block, x, ref = block_x
    chunk = block.layout["chunk_frames"] * block.layout["tokens_per_frame"]
    art = rc.build(HybridBlockStep(block), (x[:, :chunk],), target="cpu", out_dir=tmp_path / "s", streaming=True)
    step_inputs = art.manifest["entries"]["step"]["inputs"]
    assert [s["role"] for s in step_inputs] == ["input"] + ["state"] * len(rc.HybridState._fields)
    assert [s["name"] for s in step_inputs[1:]] == list(rc.HybridState._fields)
    outs, state = [], ()
    for start in range(0, 2 * chunk, chunk):  # the steady step graph has full-chunk shapes
        y, *state = art(x[:, start:start + chunk], *state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, :2 * chunk], atol=CPU_TOL, rtol=CPU_TOL)


def test_mlir_cpu_build_matches_pytorch(block_x, tmp_path):
    pytest.importorskip("torch_mlir")
    block, x, ref = block_x
    art = rc.build(block, (x,), target="cpu", backend="mlir", out_dir=tmp_path / "mlir")
    assert {"main.linalg.mlir", "main.llvm.mlir", "main.o"} <= set(art.manifest["files"])
    assert (tmp_path / "mlir" / "main.o").read_bytes()[:4] == b"\x7fELF"
    torch.testing.assert_close(art(x), ref, atol=CPU_TOL, rtol=CPU_TOL)
