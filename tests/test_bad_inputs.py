"""Bad and unusual inputs a demanding user tries (issue 17): nothing lost, nothing silently wrong.

``CASES`` is the table to scan: what the user does, the error it must raise, and words its message
must contain (the argument or file it names, and what was expected). ``CLI_CASES`` is the same for
the command line (exit code 2). Below them, each item's own test where one row is not enough: a
folder that must survive byte for byte, a pipeline run that must equal the converted model, a model
called at a second frame count, LTX-Video streamed in chunks of 2 frames.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import rehyat_compile as rc
from rehyat_compile.build import FORMAT as ARTIFACT_FORMAT, _manifest_digest, sha256_of
from rehyat_compile.cli import main
from rehyat_compile.errors import CheckpointError, ConversionError

from blocks import block_and_input
from models import make_wan_t2v


# ---------------------------------------------------------------------------------------------
# Helpers the table's inputs are made with
# ---------------------------------------------------------------------------------------------

def user_folder(root: Path) -> Path:
    """A user's folder that happens to hold a manifest.json (not ours) among other files."""
    folder = root / "holiday-videos"
    (folder / "raw").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"videos": ["a.mp4", "b.mp4"], "owner": "me"}))
    (folder / "notes.txt").write_text("do not lose these\n")
    (folder / "raw" / "a.mp4").write_bytes(bytes(range(256)) * 4)
    return folder


def minimal_artifact(folder: Path) -> Path:
    """A folder that verifies as an rc.build artifact (format, digest, every file's sha256) with no
    compiled entries: enough for the out_dir checks, which run before anything is compiled."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "weights.safetensors"))
    manifest = {"format": ARTIFACT_FORMAT, "target": "cpu", "backend": "tvm", "entries": {},
                "files": {"weights.safetensors": sha256_of(folder / "weights.safetensors")}}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def artifact_with_users_file(root: Path) -> Path:
    folder = minimal_artifact(root / "art")
    (folder / "mine.txt").write_text("notes")
    return folder


def tampered_artifact(root: Path) -> Path:
    folder = minimal_artifact(root / "art")
    (folder / "weights.safetensors").write_bytes(b"edited")
    return folder


def a_file(root: Path) -> Path:
    (root / "file").write_text("x")
    return root / "file"


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def build_block(out_dir: Path):
    block, x = block_and_input()
    return rc.build(block, (x,), target="cpu", out_dir=out_dir)


def step_after_short_chunk():
    """rc.hybrid_attention_step fed 2 frames, then 3, with chunk_frames=3: the first chunk was short."""
    m = 2
    q, k, v = (torch.randn(1, 2, 5 * m, 4) for _ in range(3))
    fq, fk = (torch.rand(1, 2, 5 * m, 3) for _ in range(2))
    layout = dict(tokens_per_frame=m, chunk_frames=3, overlap_frames=1)
    _, state = rc.hybrid_attention_step(*(t[:, :, :2 * m] for t in (q, k, v, fq, fk)), None, **layout)
    rc.hybrid_attention_step(*(t[:, :, 2 * m:] for t in (q, k, v, fq, fk)), state, **layout)


WIDTH_32 = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                num_layers=2, rope_max_seq_len=64)


def wan_4x8_heads():
    """A tiny Wan of the zoo's width (32) with 4 heads x 8 head dim instead of 2 x 16."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=4, attention_head_dim=8, **WIDTH_32).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the zoo's 2 x 16-head tiny Wan."""
    model, args, kwargs = make_wan_t2v(frames=4)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1, feature_dim=8)
    return rc.save_hybrid(hybrid, tmp_path_factory.mktemp("ckpt") / "wan.safetensors")


def damaged(checkpoint: Path, tmp: Path, how: str) -> Path:
    """A copy of ``checkpoint`` cut short, overwritten or with one byte of its tensor data flipped."""
    data = bytearray(checkpoint.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "not safetensors":
        data = bytearray(b"PK\x03\x04 this is a zip file, not safetensors" * 8)
    elif how == "flipped byte":
        data[-3] ^= 0x55
    path = tmp / f"{how.replace(' ', '-')}.safetensors"
    path.write_bytes(bytes(data))
    return path


def without_heads_record(checkpoint: Path, tmp: Path) -> Path:
    """``checkpoint`` as saved before fingerprints held heads x head dim: the converted sites' own
    counts (compared after an eager conversion) are then what refuses another geometry."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = dict(f.metadata())
    fingerprint = json.loads(metadata["model"])
    del fingerprint["attention"]
    metadata["model"] = json.dumps(fingerprint)
    path = tmp / "without-heads.safetensors"
    save_file(load_file(str(checkpoint)), str(path), metadata=metadata)
    return path


def foreign_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file
    path = tmp / "someone-elses.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# The table: input -> error type -> words the message must contain
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    input: str                                   # what the user does, in words
    run: Callable[[Path, Path], object]          # (tmp_path, checkpoint) -> raises
    error: type
    words: tuple[str, ...]


CASES = [
    # 1. a build never deletes what it cannot prove is its own artifact
    Case("build into a user's folder that holds a manifest.json", lambda tmp, _: build_block(user_folder(tmp)),
         ValueError, ("out_dir", "holiday-videos", "not an intact rc.build artifact", "refusing")),
    Case("build into a previous artifact the user added a file to",
         lambda tmp, _: build_block(artifact_with_users_file(tmp)),
         ValueError, ("out_dir", "files it did not write", "mine.txt")),
    Case("build into a tampered artifact", lambda tmp, _: build_block(tampered_artifact(tmp)),
         ValueError, ("out_dir", "tampered", "weights.safetensors")),
    Case("build with out_dir naming a file", lambda tmp, _: build_block(a_file(tmp)),
         ValueError, ("out_dir", "is not a folder")),
    # 4. the recurrent step refuses a chunk after a short one
    Case("hybrid_attention_step: 2 frames, then 3, with chunk_frames=3", lambda tmp, _: step_after_short_chunk(),
         ValueError, ("state", "shorter than chunk_frames", "last")),
    # 9. heads and head dim are part of what a checkpoint fits
    Case("load a 2x16-head checkpoint into a 4x8-head model of the same width (lazy)",
         lambda tmp, ckpt: rc.load_hybrid(wan_4x8_heads(), ckpt),
         ConversionError, ("blocks.0.attn1", "4 heads x 8 head dim", "2 x 16")),
    Case("load a checkpoint without the heads record (saved before it) into a 4x8-head model, with inputs",
         lambda tmp, ckpt: rc.load_hybrid(wan_4x8_heads(), without_heads_record(ckpt, tmp),
                                          *make_wan_t2v(frames=4)[1:]),
         ConversionError, ("without-heads.safetensors", "site 'blocks.0.attn1' has 4 heads x 8 head dim", "2 x 16")),
    # 10. unreadable checkpoints name the file and what is wrong
    Case("load a truncated checkpoint",
         lambda tmp, ckpt: rc.load_hybrid(make_wan_t2v(4)[0], damaged(ckpt, tmp, "truncated")),
         CheckpointError, ("path", "truncated.safetensors", "not a readable safetensors file")),
    Case("load a file that is not safetensors",
         lambda tmp, ckpt: rc.load_hybrid(make_wan_t2v(4)[0], damaged(ckpt, tmp, "not safetensors")),
         CheckpointError, ("not-safetensors.safetensors", "not a readable safetensors file")),
    Case("load a checkpoint with one byte of its weights flipped",
         lambda tmp, ckpt: rc.load_hybrid(make_wan_t2v(4)[0], damaged(ckpt, tmp, "flipped byte")),
         CheckpointError, ("flipped-byte.safetensors", "corrupted", "sha256")),
    Case("load someone else's safetensors file",
         lambda tmp, _: rc.load_hybrid(make_wan_t2v(4)[0], foreign_safetensors(tmp)),
         CheckpointError, ("someone-elses.safetensors", "not a rehyat-compile hybrid checkpoint")),
    # 7. a state dict into a lazily converted model, before its feature maps exist
    Case("hybrid.load_state_dict(sd) before the lazy hybrid's first call",
         lambda tmp, _: lazy_hybrid().load_state_dict(converted_state_dict()),
         ConversionError, ("load_state_dict", "Call the model once", "rc.load_hybrid")),
    # 12. layers: one name is a name; an empty list is refused naming layers
    Case("rc.transform(..., layers=[])", lambda tmp, _: rc.transform(make_wan_t2v(4)[0], layers=[]),
         ValueError, ("layers=[]", "layers=None")),
    Case("rc.transform(..., layers=[3])", lambda tmp, _: rc.transform(make_wan_t2v(4)[0], layers=[3]),
         TypeError, ("layers must be", "site name")),
]


def lazy_hybrid():
    return rc.transform(make_wan_t2v(4)[0], chunk_frames=2, overlap_frames=1)


def converted_state_dict():
    model, args, kwargs = make_wan_t2v(4)
    return rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1).state_dict()


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input_raises_an_error_naming_what_is_wrong(case, tmp_path, checkpoint):
    with pytest.raises(case.error) as raised:
        case.run(tmp_path, checkpoint)
    missing = [w for w in case.words if w not in str(raised.value)]
    assert not missing, f"{case.input}: message lacks {missing}: {raised.value}"


# ---------------------------------------------------------------------------------------------
# 11. The command line: exit code 2 and a message naming the option or file and the expected form
# ---------------------------------------------------------------------------------------------

def wan_config(tmp: Path, text: str) -> str:
    path = tmp / "config.json"
    path.write_text(text)
    return str(path)


CLI_CASES = [
    ("a config file holding a JSON list", lambda tmp: ["inspect", "diffusers:WanTransformer3DModel", "--config",
                                                       wan_config(tmp, "[1, 2]")],
     ("--config", "config.json", "JSON object", "list")),
    ("a config file that is broken JSON", lambda tmp: ["inspect", "diffusers:WanTransformer3DModel", "--config",
                                                       wan_config(tmp, '{"num_layers": 2,')],
     ("--config", "config.json", "not valid JSON")),
    ("a config with a string where an int belongs",
     lambda tmp: ["inspect", "diffusers:WanTransformer3DModel", "--config",
                  wan_config(tmp, json.dumps({**WIDTH_32, "num_attention_heads": "2", "attention_head_dim": 16}))],
     ("--config", "config.json", "'num_attention_heads'", "must be int")),
    ("a config file that does not exist", lambda tmp: ["inspect", "diffusers:WanTransformer3DModel", "--config",
                                                       str(tmp / "nope.json")],
     ("--config", "nope.json", "no such file")),
    ("--frames -2", lambda tmp: ["inspect", "--preset", "wan2.1-tiny", "--frames", "-2"],
     ("--frames", "integer >= 1", "-2")),
    ("--frames 0", lambda tmp: ["inspect", "--preset", "wan2.1-tiny", "--frames", "0"],
     ("--frames", "integer >= 1", "0")),
    ("--chunk-frames 0", lambda tmp: ["transform", "--preset", "wan2.1-tiny", "--chunk-frames", "0"],
     ("--chunk-frames", "integer >= 1")),
    ("--overlap-frames -1", lambda tmp: ["transform", "--preset", "wan2.1-tiny", "--overlap-frames", "-1"],
     ("--overlap-frames", "integer >= 0")),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_exits_2_naming_the_option_or_file(argv, words, tmp_path, capsys):
    try:
        code = main([*argv(tmp_path), "--json"])
    except SystemExit as exit_:  # argparse's own refusal of an option value
        code = exit_.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, text
    missing = [w for w in words if w not in text]
    assert not missing, f"message lacks {missing}: {text}"
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------------
# 1. A user's folder survives byte for byte; a build's own previous artifact is replaced
# ---------------------------------------------------------------------------------------------

def test_build_leaves_a_users_folder_with_a_manifest_byte_for_byte(tmp_path):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="out_dir"):
        build_block(folder)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday-videos"]  # no staging folder left behind


def test_build_leaves_an_artifact_with_a_users_file_byte_for_byte(tmp_path):
    folder = artifact_with_users_file(tmp_path)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="did not write"):
        build_block(folder)
    assert snapshot(folder) == before


def test_build_replaces_its_own_previous_artifact(tmp_path):
    pytest.importorskip("tvm")
    minimal_artifact(tmp_path / "art")
    art = build_block(tmp_path / "art")
    assert art.runnable and "main.so" in art.manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old one is gone, no staging left


# ---------------------------------------------------------------------------------------------
# 4. Full chunks and a short last one are still accepted, and the state after them is final
# ---------------------------------------------------------------------------------------------

def test_step_marks_only_the_state_after_a_short_chunk_final():
    m, layout = 2, dict(tokens_per_frame=2, chunk_frames=3, overlap_frames=1)
    x = torch.randn(1, 2, 5 * m, 4)
    _, full = rc.hybrid_attention_step(x[:, :, :3 * m], x[:, :, :3 * m], x[:, :, :3 * m], x[:, :, :3 * m].abs(),
                                       x[:, :, :3 * m].abs(), None, **layout)
    _, last = rc.hybrid_attention_step(x[:, :, 3 * m:], x[:, :, 3 * m:], x[:, :, 3 * m:], x[:, :, 3 * m:].abs(),
                                       x[:, :, 3 * m:].abs(), full, **layout)
    assert type(full) is rc.HybridState
    assert isinstance(last, rc.HybridState) and type(last) is not rc.HybridState
    assert [t.shape for t in last] == [t.shape for t in full]  # same six fixed-shape tensors


# ---------------------------------------------------------------------------------------------
# 8. The streaming runner as pipe.transformer: WanPipeline with CFG equals the converted model
# ---------------------------------------------------------------------------------------------

def _generate(transformer):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=None, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.transformer = transformer  # as the issue does it
    prompt = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    negative = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=32, width=32, num_frames=13,
                num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


def test_stream_runner_generates_through_wan_pipeline_with_cfg_like_the_converted_model(monkeypatch):
    model, args, kwargs = make_wan_t2v()
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    with torch.no_grad():  # feature maps unlike their init, so the linear part matters
        for p in hybrid.feature_maps.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    converted = _generate(hybrid)

    runner = rc.stream(hybrid)
    assert runner.config is model.config and runner.dtype == torch.float32 and runner.device == torch.device("cpu")
    assert isinstance(runner, torch.nn.Module)
    chunks = []
    run_chunks = type(runner)._run_chunks

    def counted(self, *a, **k):
        for item in run_chunks(self, *a, **k):
            chunks.append(item)
            yield item

    monkeypatch.setattr(type(runner), "_run_chunks", counted)
    streamed = _generate(runner)
    # 13 video frames = 4 latent frames = 2 chunks of 2, per call; 2 steps x (cond + uncond) calls
    assert len(chunks) == 2 * 2 * 2
    torch.testing.assert_close(streamed, converted, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 13. CogVideoX 1.0 converted at 5 frames and called at 7 (its positional table is rebuilt then)
# ---------------------------------------------------------------------------------------------

def test_cogvideox_converted_at_5_frames_runs_at_7_like_the_original():
    from models import make_cogvideox
    model, args, kwargs = make_cogvideox(frames=5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=8, overlap_frames=1)  # one chunk: exact
    _, args7, kwargs7 = make_cogvideox(frames=7)  # same inputs at 7 frames; model config still says 5
    with torch.no_grad():
        want, got = model(*args7, **kwargs7)[0], hybrid(*args7, **kwargs7)[0]
    assert got.shape == want.shape == (1, 7, 4, 8, 8)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


# ---------------------------------------------------------------------------------------------
# 14. LTX-Video's tokens are frame-major, and it streams with chunks of 2 frames
# ---------------------------------------------------------------------------------------------

def test_ltx_video_tokens_are_frame_major_in_its_own_rope_grid():
    from models import make_ltx_video
    model = make_ltx_video(frames=2)[0]
    grid = model.rope._prepare_video_coords(1, 3, 4, 4, None, torch.device("cpu"))  # [B, tokens, (f, h, w)]
    assert torch.equal(grid[0, :, 0], torch.arange(3.0).repeat_interleave(16))


def test_ltx_video_streams_in_chunks_of_2_frames_like_the_parallel_form():
    from models import make_ltx_video
    model, args, kwargs = make_ltx_video(frames=5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1, video_shape=(5, 4, 4))
    chunk = rc.inspect(model, *make_ltx_video(frames=2)[1:], video_shape=(2, 4, 4))  # what each chunk is traced as
    assert [s.frame_major for s in chunk.sites if s.rewritable] == [True, True]
    with torch.no_grad():
        streamed, parallel = rc.stream(hybrid)(*args, **kwargs)[0], hybrid(*args, **kwargs)[0]
    assert ((streamed - parallel).abs().max() / parallel.abs().max()).item() < 1e-4
