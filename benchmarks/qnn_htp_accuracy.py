"""The converted tiny Wan2.1 on QNN's HTP simulator: fp16 and w8a16 vs fp32 PyTorch, per SoC.

    python benchmarks/qnn_htp_accuracy.py [--out benchmarks/results/qnn_htp_accuracy.json]

Model: ``rehyat_compile.zoo.make_wan_t2v`` (5 latent frames, 4x4 tokens per frame, 2 heads x 16)
converted with Tc=2, To=1. Builds ``rc.build(..., target="qnn-htp")`` for every SoC of
``HTP_SOCS`` (v73, v75, v79) in each precision, whole graph and streaming step graph. w8a16 is
calibrated on the build's example inputs (seed 1); errors are measured on held-out inputs (another
latent and text, seed 7). Whole graph: max |HTP - PyTorch| of the output, and that over max |PyTorch|.
Step graph: two chunks on HTP, the first from the initial state, the second from the state HTP
returned, vs ``rc.stream(hybrid).step_module`` in PyTorch fed its own states; errors of the chunk
output and of the carried linear state ``s`` / ``z`` (the hybrid op's state precision in that mode).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import rehyat_compile as rc
from rehyat_compile.backends import qnn
from rehyat_compile.backends.portable import tensor_leaves
from rehyat_compile.backends.targets import HTP_PRECISIONS, HTP_SOCS


def converted_tiny_wan(seed: int = 1):
    """(hybrid, args, kwargs) of the tiny Wan2.1 (5 frames, Tc=2, To=1), and held-out (args, kwargs)."""
    from rehyat_compile.zoo import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=5)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=2, overlap_frames=1)
    gen = torch.Generator().manual_seed(7)
    held = (torch.randn(args[0].shape, generator=gen),), {**kwargs, "encoder_hidden_states": torch.randn(
        kwargs["encoder_hidden_states"].shape, generator=gen)}
    return hybrid, args, kwargs, held


def max_errors(got, want) -> dict:
    err = (got.float() - want.float()).abs().max().item()
    return {"max_abs": err, "max_ref": want.abs().max().item(), "relative": err / max(want.abs().max().item(), 1e-12)}


def whole_graph_errors(art, hybrid, held) -> dict:
    """{soc: errors} of the whole graph's output on the held-out inputs."""
    args, kwargs = held
    with torch.no_grad():
        want = hybrid(*args, **kwargs)[0]
    entry = art.manifest["entries"]["main"]
    inputs = tensor_leaves(args, kwargs)
    results = {}
    for soc in qnn.socs_of(art.target):
        run = qnn.load_entry(art.out_dir, art.target, entry["files"], soc=soc.name)
        got = torch.from_numpy(run(list(inputs))[0])
        results[soc.name] = max_errors(got, want)
    return results


def step_chunk_errors(art, hybrid, held, chunks: int = 2) -> dict:
    """{soc: [per chunk {output, s, z errors}]}: ``chunks`` chunks on HTP, HTP's state fed through."""
    args, kwargs = held
    runner = rc.stream(hybrid)
    step, _ = runner.step_module(*args, **kwargs)
    calls = runner.step_inputs(*args, **kwargs)[:chunks]
    entry = art.manifest["entries"]["step"]
    roles = [s["role"] for s in entry["outputs"]]
    names = [s["name"] for s in entry["outputs"]]
    n_state = roles.count("state")
    results = {}
    for soc in qnn.socs_of(art.target):
        run = qnn.load_entry(art.out_dir, art.target, entry["files"], soc=soc.name)
        got_state = want_state = None
        per_chunk = []
        for _, inputs in calls:
            chunk = list(inputs[:len(inputs) - n_state])
            got = [torch.from_numpy(x) for x in run(chunk + list(got_state if got_state else inputs[-n_state:]))]
            with torch.no_grad():
                want = list(step(*chunk, *(want_state if want_state else inputs[-n_state:])))
            errors = {"output": max_errors(got[0], want[0])}
            for kind in ("s", "z"):
                picked = [i for i, n in enumerate(names) if n.endswith(f".{kind}")]
                errors[kind] = max(
                    (max_errors(got[i], want[i]) for i in picked), key=lambda e: e["relative"])
            per_chunk.append(errors)
            got_state, want_state = got[len(got) - n_state:], want[len(want) - n_state:]
        results[soc.name] = per_chunk
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    opts = parser.parse_args(argv)
    hybrid, args, kwargs, held = converted_tiny_wan()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in HTP_PRECISIONS:
            options = {"soc": tuple(HTP_SOCS), "precision": precision}
            t0 = time.perf_counter()
            whole = rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=Path(tmp) / f"whole-{precision}",
                             target_options=options)
            t1 = time.perf_counter()
            streaming = rc.build(hybrid, args, kwargs, target="qnn-htp", out_dir=Path(tmp) / f"step-{precision}",
                                 streaming=True, target_options=options)
            t2 = time.perf_counter()
            result[precision] = {"whole": whole_graph_errors(whole, hybrid, held),
                                 "step": step_chunk_errors(streaming, hybrid, held),
                                 "build_seconds": {"whole": t1 - t0, "streaming": t2 - t1}}
    for precision, r in result.items():
        print(f"{precision}: build whole {r['build_seconds']['whole']:.0f} s, streaming {r['build_seconds']['streaming']:.0f} s")
        for soc, e in r["whole"].items():
            print(f"  whole {soc} (v{HTP_SOCS[soc].htp_arch}): max |err| {e['max_abs']:.4f} "
                  f"(max |ref| {e['max_ref']:.3f}, relative {e['relative']:.4f})")
        for soc, chunks in r["step"].items():
            for i, c in enumerate(chunks):
                print(f"  step  {soc} chunk {i}: output {c['output']['max_abs']:.4f} (rel {c['output']['relative']:.4f}), "
                      f"state s {c['s']['max_abs']:.2e} (rel {c['s']['relative']:.4f}), "
                      f"z {c['z']['max_abs']:.2e} (rel {c['z']['relative']:.4f})")
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
