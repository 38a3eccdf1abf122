"""Memory of the QNN HTP builds vs video length, and paper-scale memory traffic of the decomposition
the mobile targets run.

    python benchmarks/qnn_memory.py [--frames 5 9 17] [--paper 81 121 161] [--out results.json]

1. Tiny Wan2.1 (``zoo.make_wan_t2v``, converted with Tc=2, To=1) at 5, 9 and 17 latent frames:
   the original (unconverted) whole graph and the converted streaming step graph are built for
   ``qnn-htp`` (fp16, SM8750 / HTP v79); per build: the QNN context binary's bytes, and from the
   cost model (``rc.cost(..., attention="portable")``, the decomposition the builds compile) the
   bytes read + written and the peak live activation bytes -- for the step graph per chunk (one
   call), for the original per forward. The step graph is the same graph at every length.
2. Wan2.1-T2V-1.3B, one block on the meta device (480x832, 512 text tokens): bytes moved by a block,
   original vs converted, ``attention="portable"`` (score matrices materialised, as the mobile
   builds run; not the fused GPU kernel), at 81, 121, 161 video frames (21, 31, 41 latent frames).
   Per-block costs as in ``benchmarks/cost_vs_duration.py`` (a 1-block model minus the 0-block one).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import sympy

import rehyat_compile as rc
from rehyat_compile.symbolic import T

CHUNK, OVERLAP = 2, 1
PAPER_CHUNKS = ((1, 0), (1, 1), (2, 1), (3, 1))


def _value(expr, frames: int) -> float:
    return float(sympy.sympify(expr).subs(T, frames))


def _binary_bytes(art, entry: str) -> int:
    files = art.manifest["entries"][entry]["files"]
    return sum((art.out_dir / name).stat().st_size for key, name in files.items() if key.endswith(".binary"))


def tiny_row(frames: int, tmp: Path) -> dict:
    """Original whole graph vs converted step graph of the tiny Wan2.1 at ``frames`` latent frames."""
    from rehyat_compile.zoo import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=frames)
    options = {"soc": "sm8750", "precision": "fp16"}
    original = rc.build(model, args, kwargs, target="qnn-htp", out_dir=tmp / f"orig-{frames}", target_options=options)
    cost = rc.cost(model, args, kwargs, attention="portable")
    hybrid = rc.transform(model, args, kwargs, chunk_frames=CHUNK, overlap_frames=OVERLAP)
    streaming = rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=tmp / f"step-{frames}", streaming=True,
                         target_options=options)
    step, example = rc.stream(hybrid).step_module(*args, **kwargs)
    step_cost = rc.cost(step, example, chunk_frames=CHUNK, attention="portable")
    chunks = -(-frames // CHUNK)
    return {"frames": frames,
            "original": {"binary_bytes": _binary_bytes(original, "main"), "bytes": _value(cost.bytes, frames),
                         "peak_bytes": _value(cost.peak_memory, frames)},
            "step": {"binary_bytes": _binary_bytes(streaming, "step"),
                     "bytes_per_chunk": _value(step_cost.bytes, frames) / chunks,
                     "peak_bytes": _value(step_cost.peak_memory, frames),
                     "state_bytes": rc.stream(hybrid).state_nbytes(*args, **kwargs)}}


def paper_scale(frames_list: list[int]) -> dict:
    """Bytes per Wan2.1-1.3B block, original vs converted, at the given video frame counts."""
    import cost_vs_duration as cvd
    example = cvd.wan_inputs(13)  # several chunks, so the decomposition's expressions hold for long videos
    base = rc.cost(cvd.wan(0), kwargs=example, attention="portable")

    def block(model) -> sympy.Expr:
        return sympy.expand(rc.cost(model, kwargs=example, attention="portable").bytes - base.bytes)

    original = block(cvd.wan(1))
    converted = {(tc, to): block(cvd.convert(cvd.wan(1), tc, to, example)) for tc, to in PAPER_CHUNKS}
    rows = []
    for frames in frames_list:
        t = (frames - 1) // 4 + 1  # 16 fps video, 4x temporal VAE
        o = _value(original, t)
        rows.append({"video_frames": frames, "T": t, "original_bytes": o,
                     **{f"Tc{tc}_To{to}": {"bytes": _value(e, t), "ratio": o / _value(e, t)}
                        for (tc, to), e in converted.items()}})
    return {"rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="*", default=[5, 9, 17])
    parser.add_argument("--paper", type=int, nargs="*", default=[81, 121, 161])
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    started = time.perf_counter()
    result = {"tiny": [], "paper": None}
    with tempfile.TemporaryDirectory() as tmp:
        for frames in opts.frames:
            result["tiny"].append(tiny_row(frames, Path(tmp)))
    print(f"tiny Wan2.1, qnn-htp fp16 SM8750; step graph Tc={CHUNK} To={OVERLAP} (per chunk) vs original (per forward)")
    print(f"{'T':>3} {'orig bin KiB':>12} {'orig MB moved':>13} {'orig peak KiB':>13} | {'step bin KiB':>12} "
          f"{'step MB/chunk':>13} {'step peak KiB':>13} {'state KiB':>9}")
    for r in result["tiny"]:
        o, s = r["original"], r["step"]
        print(f"{r['frames']:>3} {o['binary_bytes'] / 1024:>12.0f} {o['bytes'] / 1e6:>13.2f} {o['peak_bytes'] / 1024:>13.0f} | "
              f"{s['binary_bytes'] / 1024:>12.0f} {s['bytes_per_chunk'] / 1e6:>13.2f} {s['peak_bytes'] / 1024:>13.0f} "
              f"{s['state_bytes'] / 1024:>9.1f}")
    if opts.paper:
        import sys
        sys.path.insert(0, str(Path(__file__).parent))
        result["paper"] = paper_scale(opts.paper)
        print("\nWan2.1-1.3B, one block, GB moved (attention='portable': the mobile builds' decomposition)")
        for r in result["paper"]["rows"]:
            parts = ", ".join(f"{k}: {v['bytes'] / 1e9:.1f} ({v['ratio']:.2f}x less)" for k, v in r.items()
                              if k.startswith("Tc"))
            print(f"  {r['video_frames']} frames (T={r['T']}): original {r['original_bytes'] / 1e9:.1f}; {parts}")
    result["seconds"] = time.perf_counter() - started
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1))
    print(f"({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
