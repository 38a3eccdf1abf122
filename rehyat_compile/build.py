"""Ahead-of-time builds: ``rc.build`` writes an artifact folder, ``rc.load`` verifies and runs it.

An artifact is a folder with the compiled files of one or two entries (``main``; or ``first`` and
``step`` for a streaming build), ``weights.safetensors`` and ``manifest.json`` (target, backend,
compiler versions, input/output specs with state tensors, the cost, sha256 of every file).
Every backend compiles the same thing: the exported graph in standard aten ops as a function of
(weights..., inputs...) (``rehyat_compile.backends.portable``).

Streaming builds take either a causal converted model (``rc.transform``), whose recurrent step
graph comes from ``rc.stream(model).step_module(*args, **kwargs)`` (one entry ``step``: chunk
inputs, per-chunk tables and per-layer states in, chunk outputs and next states out; ``args`` are
the whole video's inputs), or a hand-written *step module*: an nn.Module with a ``state_names``
attribute whose ``forward(*inputs, *state)`` returns ``(*outputs, *next_state)`` and accepts the
state left out for the first chunk (entries ``first`` and ``step``; ``args`` are one chunk's).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends.portable import FlatProgram, flat_program, portable_program, positional_names, tensor_leaves
from .backends.targets import BACKENDS, TARGETS, NotRunnableHere, Target, resolve, with_options

FORMAT = "rehyat-compile-artifact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TABLES = "tables.safetensors"  # streaming builds of converted models: the example video's position tables


class ArtifactError(ValueError):
    """An artifact folder is incomplete, tampered with, or not an artifact."""


def _backend(name: str):
    return importlib.import_module(f"rehyat_compile.backends.{name}")


# ---------------------------------------------------------------------------------------------
# What gets compiled
# ---------------------------------------------------------------------------------------------

def _as_tuple(args) -> tuple:
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def _entries(model, args: tuple, kwargs: dict, streaming: bool) -> tuple[dict[str, FlatProgram], tuple]:
    """({entry name: FlatProgram}, (module, args, kwargs, chunk_frames) whose cost goes in the
    manifest): ``main``; ``first`` + ``step`` for a step module; ``step`` for a converted model."""
    if not streaming:
        main = flat_program(portable_program(model, args, kwargs), args, kwargs,
                            arg_names=positional_names(model, len(args)))
        return {"main": main}, (model, args, kwargs, None)
    state_names = getattr(model, "state_names", None)
    if not state_names:
        return _stream_step_entries(model, args, kwargs)
    if kwargs:
        raise ValueError("streaming builds take the chunk inputs as positional args; kwargs must be empty")
    with torch.no_grad():
        first_out = model(*args)
    state = tuple(first_out[len(first_out) - len(state_names):])
    names = positional_names(model, len(args))
    first = flat_program(portable_program(model, args), args, state_names=tuple(state_names), arg_names=names)
    step_args = (*args, *state)
    step = flat_program(portable_program(model, step_args), step_args, state_names=tuple(state_names),
                        state_inputs=True, arg_names=names + list(state_names))
    return {"first": first, "step": step}, (model, args, {}, getattr(model, "chunk_frames", None))


def _stream_step_entries(model, args: tuple, kwargs: dict) -> tuple[dict[str, FlatProgram], tuple]:
    """{'step': ..., 'step_last': ...} for a converted model through ``rc.stream``: one chunk's graph
    of (chunk inputs, per-chunk tables, per-layer states) -> (chunk outputs, next states), and the
    short last chunk's when the chunks do not divide the example video."""
    from .stream import stream
    try:
        runner = stream(model)
        step, example = runner.step_module(*args, **kwargs)
        names = runner.signature(*args, **kwargs)
        last = runner.last_step_module(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError("streaming=True needs a causal converted model (rc.transform(..., causal=True)) or a "
                         "step module with a 'state_names' attribute whose forward(*inputs, *state) returns "
                         f"(*outputs, *next_state); {type(model).__name__} is neither: {err}") from err
    states = tuple(names["states_in"])
    arg_names = names["inputs"] + names["tables"] + list(states)
    calls = runner.step_inputs(*args, **kwargs)
    entries = {}
    for name, (module, example_inputs) in (("step", (step, example)), ("step_last", last)):
        if module is not None:
            flat = flat_program(portable_program(module, tuple(example_inputs)), tuple(example_inputs),
                                state_names=states, state_inputs=True, arg_names=arg_names)
            length = calls[0][0] if name == "step" else calls[-1][0]  # the first chunk is full unless the video is short
            flat.calibration = [inputs for frames, inputs in calls if frames == length]
            entries[name] = flat
    return entries, (step, tuple(example), {}, names["chunk_frames"])


def _write_stream_spec(model, args: tuple, kwargs: dict, out: Path) -> dict:
    """The chunking a loaded artifact needs to run the example's video chunk by chunk
    (``Artifact.stream``); the whole video's tables go to ``tables.safetensors``."""
    from safetensors.torch import save_file
    from .stream import stream
    spec, tables = stream(model).stream_spec(*args, **kwargs)
    save_file({f"table_{i}": t for i, t in enumerate(tables)}, str(out / TABLES))
    return spec


def _output_structure(model, args: tuple, kwargs: dict) -> str:
    """``torch.utils._pytree`` spec (JSON) of the model's output, to rebuild it from flat tensors."""
    from torch.utils import _pytree
    with torch.no_grad():
        return _pytree.treespec_dumps(_pytree.tree_structure(model(*args, **kwargs)))


def _cost(model, args: tuple, kwargs: dict, chunk_frames: int | None) -> dict:
    """Symbolic cost (rc.cost, symbol T = latent frames; a step graph's cost is per call times
    ceil(T / chunk_frames)) when available, else the FLOP count of the example call; the reason is
    recorded when the symbolic cost could not be derived."""
    import rehyat_compile as rc
    reason = "rc.cost is not available in this build"
    if hasattr(rc, "cost"):
        try:
            report = (rc.cost(model, args, kwargs, chunk_frames=chunk_frames) if chunk_frames
                      else rc.cost(model, args, kwargs))
            return {"symbol": "T (latent frames)", **{m: str(getattr(report, m)) for m in
                    ("flops", "flops_elementwise", "bytes", "peak_memory")}}
        except Exception as err:  # the cost model declines some graphs; the build still stands
            reason = f"{type(err).__name__}: {err}"[:500]
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return {"flops_at_example": int(counter.get_total_flops()), "symbolic_unavailable": reason}


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _versions(backend: str) -> dict:
    import rehyat_compile
    found = {"rehyat_compile": rehyat_compile.__version__, "torch": torch.__version__,
             "python": platform.python_version()}
    found.update(_backend(backend).versions())
    return found


def _write_weights(entries: dict[str, FlatProgram], out_dir: Path) -> None:
    from safetensors.torch import save_file
    weights = {}
    for flat in entries.values():
        for name, tensor in flat.weights.items():
            weights.setdefault(name, tensor.detach().cpu().contiguous())
    save_file(weights, str(out_dir / WEIGHTS))


# ---------------------------------------------------------------------------------------------
# rc.build
# ---------------------------------------------------------------------------------------------

def build(model, args=(), kwargs=None, *, target: str, backend: str | None = None, out_dir,
          streaming: bool = False, target_options: dict | None = None) -> "Artifact":
    """Compile ``model(*args, **kwargs)`` ahead of time for ``target`` with ``backend`` (None: the
    target's default, see ``rehyat_compile.backends.targets.TARGETS``) into ``out_dir``.

    streaming=True builds the recurrent step graph of a step module (module docstring) instead of
    the whole graph. target_options overrides the target's options (``TARGETS[target].options``),
    e.g. ``{"versions": ("v75",)}`` for hexagon or ``{"archs": ("sm_90",)}`` for cuda.
    Returns the loaded artifact (``rc.load(out_dir)``)."""
    spec, backend = resolve(target, backend)
    spec = with_options(spec, target_options)
    check_options = getattr(_backend(backend), "check_options", None)  # a backend's own option values
    if check_options is not None:
        check_options(spec)
    if not isinstance(streaming, bool):
        raise TypeError(f"streaming must be a bool, got {type(streaming).__name__}")
    if out_dir is None:
        raise ValueError("out_dir must be a folder path for the artifact, got None")
    final = Path(out_dir)
    check_replaceable(final)
    # Build into a staging folder and swap it in at the end: a failed build leaves no half artifact.
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _build_into(out, model, args, kwargs, spec, backend, streaming)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    _swap_in(out, final)
    return load(final)


def check_replaceable(out_dir: Path) -> None:
    """Raise ValueError naming ``out_dir`` unless a build may write there: it does not exist, is an
    empty folder, or is provably one of our own artifacts -- its manifest verifies (format, digest,
    every file's sha256) and the folder holds nothing the manifest does not list. Anything else may
    be a user's data, and a build never deletes that."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder (a file or a link); refusing to replace it "
                         "(give a new or empty folder, or a previous artifact folder)")
    if not any(out_dir.iterdir()):
        return
    try:
        manifest = verify(out_dir)
    except (ArtifactError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"out_dir {out_dir} is not empty and not an intact rc.build artifact ({err}); refusing to "
                         "replace it: give a new or empty folder, or a previous artifact folder") from None
    unlisted = sorted(p.name for p in out_dir.iterdir() if p.name != MANIFEST and p.name not in manifest["files"])
    if unlisted:
        raise ValueError(f"out_dir {out_dir} is an rc.build artifact but also holds files it did not write "
                         f"({', '.join(unlisted[:5])}); refusing to replace it: move them, or give another folder")


def _swap_in(staged: Path, final: Path) -> None:
    """Move the staged build to ``final``; a previous artifact there is checked again (the build
    took a while) and renamed aside, so it is only deleted once the new one is in place."""
    try:
        check_replaceable(final)
    except ValueError:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not final.exists():
        staged.rename(final)
        return
    if not any(final.iterdir()):
        final.rmdir()
        staged.rename(final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    aside.rmdir()
    final.rename(aside)
    try:
        staged.rename(final)
    except OSError:
        aside.rename(final)  # put the previous artifact back
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(aside)


def _build_into(out: Path, model, args, kwargs, spec: Target, backend: str, streaming: bool) -> None:
    args, kwargs = _as_tuple(args), dict(kwargs or {})
    if isinstance(model, torch.nn.Module):
        model = model.eval()

    started = time.perf_counter()
    entries, cost_subject = _entries(model, args, kwargs, streaming)
    exported_s = time.perf_counter() - started
    compiler = _backend(backend)
    built = {}
    for name, flat in entries.items():
        t0 = time.perf_counter()
        files = compiler.build_entry(flat, spec, out, name)
        built[name] = {"files": files, "weights": list(flat.weights),
                       "inputs": [s.to_dict() for s in flat.inputs],
                       "outputs": [s.to_dict() for s in flat.outputs],
                       "compile_seconds": round(time.perf_counter() - t0, 3)}
    _write_weights(entries, out)
    stream_spec = _write_stream_spec(model, args, kwargs, out) if streaming and "first" not in entries else None
    manifest = {
        "format": FORMAT, "target": spec.name, "backend": backend, "streaming": streaming,
        "target_description": spec.description, "target_options": {k: list(v) if isinstance(v, tuple) else v
                                                                      for k, v in spec.options.items()},
        "versions": _versions(backend),
        "entries": built, "cost": _cost(*cost_subject),
        "output_structure": None if streaming else _output_structure(model, args, kwargs),
        "stream": stream_spec,
        "build_seconds": {"export": round(exported_s, 3), "total": round(time.perf_counter() - started, 3)},
        "files": {p.name: sha256_of(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST},
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# rc.load
# ---------------------------------------------------------------------------------------------

def verify(out_dir) -> dict:
    """The manifest of ``out_dir`` after checking its own digest and every file's sha256;
    ArtifactError naming what is missing or altered."""
    folder = Path(out_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a build artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ArtifactError(f"{path} was edited after the build (its digest does not match)")
    missing = [n for n in manifest["files"] if not (folder / n).is_file()]
    if missing:
        raise ArtifactError(f"artifact {folder} is incomplete: missing {', '.join(missing)}")
    altered = [n for n, digest in manifest["files"].items() if sha256_of(folder / n) != digest]
    if altered:
        raise ArtifactError(f"artifact {folder} was tampered with: sha256 mismatch for {', '.join(altered)}")
    listed = {f for entry in manifest["entries"].values() for f in entry["files"].values()} | {WEIGHTS}
    unlisted = sorted(listed - set(manifest["files"]))
    if unlisted:
        raise ArtifactError(f"artifact {folder} lists files without checksums: {', '.join(unlisted)}")
    return manifest


@dataclass
class Entry:
    """One compiled function: ``run(*inputs) -> tuple of outputs`` (torch tensors in and out)."""

    name: str
    inputs: list[dict]
    outputs: list[dict]
    weights: list[np.ndarray] = field(repr=False)
    runner: object = field(repr=False)

    def __call__(self, *inputs):
        if len(inputs) != len(self.inputs):
            raise TypeError(f"entry {self.name!r} takes {len(self.inputs)} inputs "
                            f"({', '.join(s['name'] for s in self.inputs)}), got {len(inputs)}")
        arrays = []
        for spec, value in zip(self.inputs, inputs):
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise ValueError(f"input {spec['name']!r} must be {spec['dtype']} {spec['shape']}, "
                                 f"got {array.dtype} {list(array.shape)}")
            arrays.append(array)
        return tuple(torch.from_numpy(np.asarray(r)) for r in self.runner(self.weights + arrays))


class Artifact:
    """A verified build. ``art(*inputs)`` runs ``main`` (or, streaming, ``first`` when called with
    the chunk inputs only and ``step`` when the state follows them; a converted model's step graph
    takes chunk inputs, tables and states, see ``manifest["entries"]["step"]["inputs"]``). ``art.runnable`` says whether
    the target runs here; ``art.reason`` says why not; ``art.emulated`` names the emulator it runs under, if any."""

    def __init__(self, out_dir, manifest: dict):
        self.out_dir, self.manifest = Path(out_dir), manifest
        self.target: Target = with_options(TARGETS[manifest["target"]], manifest.get("target_options"))
        self.backend: str = manifest["backend"]
        self.entries: dict[str, Entry] = {}
        self.reason = ""
        try:
            self._load_entries()
        except NotRunnableHere as err:
            self.reason = str(err)

    def _load_entries(self) -> None:
        from safetensors.numpy import load_file
        weights = load_file(str(self.out_dir / WEIGHTS))
        compiler = _backend(self.backend)
        for name, entry in self.manifest["entries"].items():
            runner = compiler.load_entry(self.out_dir, self.target, entry["files"])
            self.entries[name] = Entry(name, entry["inputs"], entry["outputs"],
                                       [weights[w] for w in entry["weights"]], runner)

    @property
    def runnable(self) -> bool:
        return bool(self.entries)

    @property
    def emulated(self) -> str | None:
        """The emulator the entries run under (``"qemu-aarch64"`` for an aarch64 build on
        another ISA), None when they run natively or not at all."""
        return next((getattr(e.runner, "emulator", None) for e in self.entries.values()), None)

    @property
    def files(self) -> list[Path]:
        return [self.out_dir / n for n in self.manifest["files"]]

    def __repr__(self) -> str:
        return (f"Artifact({str(self.out_dir)!r}, target={self.target.name!r}, backend={self.backend!r}, "
                f"entries={list(self.manifest['entries'])}, runnable={self.runnable}"
                + (f", emulated={self.emulated!r})" if self.emulated else ")"))

    def stream(self, *args, **kwargs):
        """A streaming build of a converted model run on a whole video, called like the model: the
        inputs are cut into chunks, the position tables (computed at build time for the example's
        frame count) and the states are fed for the user, chunk outputs are joined. Equal to
        ``rc.stream(model)(*args, **kwargs)`` on the host."""
        spec = self.manifest.get("stream")
        if spec is None:
            raise ValueError(f"{self!r} is not a streaming build of a converted model "
                             "(rc.build(hybrid, ..., streaming=True)); call it directly")
        if not self.runnable:
            raise RuntimeError(f"cannot run {self!r} here: {self.reason}")
        from safetensors.torch import load_file
        from torch.utils import _pytree
        from .stream import _chunk, _flat, _frames, dim_from_json, join_chunks
        in_spec = _pytree.treespec_loads(spec["in_spec"]) if spec["in_spec"] else None
        out_spec = _pytree.treespec_loads(spec["out_spec"]) if spec["out_spec"] else None
        flat = _flat(in_spec, args, kwargs)
        input_dims = [dim_from_json(d) for d in spec["input_dims"]]
        table_dims = [dim_from_json(d) for d in spec["table_dims"]]
        frames, chunk = _frames(flat, input_dims), spec["chunk_frames"]
        if frames != spec["frames"]:
            raise ValueError(f"this artifact's position tables were computed for {spec['frames']} latent frames, "
                             f"the inputs hold {frames}; build for that video length")
        stored = load_file(str(self.out_dir / TABLES))
        tables = [stored[f"table_{i}"] for i in range(len(table_dims))]
        step = self.entries["step"]
        states = [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in step.inputs
                  if s["role"] == "state"]
        n_outputs = sum(1 for s in step.outputs if s["role"] == "output")
        chunks = []
        for start in range(0, frames, chunk):
            stop = min(start + chunk, frames)
            entry = step if stop - start == chunk or frames < chunk else self.entries["step_last"]
            inputs = [x for x in _chunk(flat, input_dims, start, stop) if isinstance(x, torch.Tensor)]
            outs = entry(*inputs, *_chunk(tables, table_dims, start, stop), *states)
            chunks.append(list(outs[:n_outputs]))
            states = list(outs[n_outputs:])
        return join_chunks(chunks, [dim_from_json(d) for d in spec["output_dims"]], out_spec)

    def __call__(self, *args, **kwargs):
        """Same call as the model: (args, kwargs) -> the model's output structure; tensors only are
        inputs (other arguments were fixed at build time)."""
        if not self.runnable:
            raise RuntimeError(f"cannot run {self!r} here: {self.reason}")
        inputs = tensor_leaves(args, kwargs)
        if "main" in self.entries:
            from torch.utils import _pytree
            outs = self.entries["main"](*inputs)
            return _pytree.tree_unflatten(list(outs), _pytree.treespec_loads(self.manifest["output_structure"]))
        first = self.entries.get("first")
        return first(*inputs) if first and len(inputs) == len(first.inputs) else self.entries["step"](*inputs)


def load(out_dir) -> Artifact:
    """Verify ``out_dir`` (manifest digest, every file's sha256) and return the artifact; raises
    ArtifactError for a tampered or incomplete artifact."""
    manifest = verify(out_dir)
    if manifest["target"] not in TARGETS or manifest["backend"] not in BACKENDS:
        raise ArtifactError(f"manifest names target {manifest['target']!r} / backend {manifest['backend']!r}; "
                            f"known: {sorted(TARGETS)} / {list(BACKENDS)}")
    return Artifact(out_dir, manifest)
