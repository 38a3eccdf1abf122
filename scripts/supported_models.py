"""Markdown table of what rc.inspect / rc.transform do on every tiny diffusers model in tests/models.py.

Usage: .venv/bin/python scripts/supported_models.py > table.md   (runs each model: ~2-3 min on 2 cores)
Columns: sites found, converted, kinds, frame axis (symbolic or static), max rel error vs the original at
one chunk covering all frames, rel difference with Tc=2, To=1, whether ``rc.stream`` of that conversion
equals it (max rel error, or the refusal), and the decline codes of the sites kept
(rehyat_compile/declines.py).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rehyat_compile as rc  # noqa: E402
from rehyat_compile.errors import ConversionError  # noqa: E402
from rehyat_compile.zoo import FRAMES, MODELS  # noqa: E402

VIDEO_SHAPE = {"ltx-video": (5, 4, 4), "ltx2-video": (5, 4, 4)}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def row(name: str) -> str:
    model, args, kwargs = MODELS[name]()
    options = dict(video_shape=VIDEO_SHAPE.get(name), frames=FRAMES.get(name))
    try:
        report = rc.inspect(model, args, kwargs, **options)
    except ConversionError as error:
        return f"| {name} | {type(model).__name__} | - | 0 | - | - | - | - | - | {getattr(error, 'code', None) or error} |"
    fa = report.frame_axis
    axis = "symbolic" if fa.dynamic else "static" + (" + video_shape" if name in VIDEO_SHAPE else "")
    if report.capture == "dynamo":  # torch.export failed: graphs captured between graph breaks
        axis = f"dynamo ({report.graphs} graphs), static"
    if name in FRAMES:
        axis += f" (frames={FRAMES[name]})"
    ok = report.rewritable
    kinds = ", ".join(sorted({s.kind for s in ok})) or "-"
    declined = sorted({s.code for s in report.sites if not s.rewritable})
    if not ok:
        return f"| {name} | {type(model).__name__} | {len(report.sites)} | 0 | - | {axis} | - | - | - | {'; '.join(declined)} |"
    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
        hybrid = rc.transform(model, args, kwargs, chunk_frames=64, **options)
        whole = hybrid(*args, **kwargs)[0]
        converted = hybrid.with_options(chunk_frames=2, overlap_frames=1)
        try:
            chunked = converted(*args, **kwargs)[0]
            diff, streams = f"{_rel(chunked, reference):.1e}", _streams(converted, chunked, args, kwargs)
        except ConversionError as error:  # a joint causal conversion whose step program cannot be built
            diff, streams = "-", _refusal(error)
    return (f"| {name} | {type(model).__name__} | {len(report.sites)} | {len(ok)} | {kinds} | {axis} | "
            f"{_rel(whole, reference):.1e} | {diff} | {streams} | {'; '.join(declined)} |")


def _streams(converted, output, args, kwargs) -> str:
    """``rc.stream`` of the converted model vs the converted model: max rel error, or why it refuses."""
    try:
        streamed = rc.stream(converted)(*args, **kwargs)[0]
    except ConversionError as error:
        return _refusal(error)
    return f"{_rel(streamed, output):.1e}"


def _refusal(error: Exception) -> str:
    """The cell for a refusal: its root cause (a joint causal conversion wraps the stream's reason)."""
    wrapped = str(error).startswith("causal=True on a model with joint attention")
    root = error.__cause__ if wrapped and isinstance(error.__cause__, ConversionError) else error
    return "refused: " + str(root).splitlines()[0][:150].replace("|", "/")


def main() -> None:
    print("| model | class | sites | converted | kind | frame axis | rel err Tc>=T | rel diff Tc=2,To=1 | streams | "
          "declined |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
