"""The host's work per call of a CUDA-graph stream runner (``rc.stream``), on any machine.

On the GPU a graph replay is one launch, so what a call costs beyond its replays is host time spent
before the first replay while the GPU waits (planning, the weights' addresses, the hoisted invariant
program, loading the graphs' inputs): ``bench_wan_step.py``'s "busy" column sees it as idle time. This
measures that work alone: the runner on the reference graphs (``cuda_graph_step.RerunGraphs``) with
replays that run nothing, so a call is only the runner's own work. Two runners side by side in one
run: the invariant program replayed as one captured graph (the default) and run op by op (its
capture refused). The latter's time includes that program's CPU compute, which on a GPU would be
launches. Also times ``weight_addresses`` against ``parameters()``.

Model: Wan2.1-1.3B blocks (``zoo.make_wan_1_3b``, random weights, bf16) on a small latent (the host's
work depends on the layers, not the tokens), Tc=3, To=1.

    PYTHONPATH=. python benchmarks/bench_stream_host.py [--layers 30] [--frames 31] [--chunks-per-step 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

import rehyat_compile as rc
from rehyat_compile.cuda_graph_step import RerunGraphs, weight_addresses


class StubbedReplays(RerunGraphs):
    """Captures as the reference graphs do; a replay runs nothing (its outputs keep what they hold)."""

    def replay(self, graph, outputs: list) -> None:
        pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--frames", type=int, default=31, help="latent frames")
    p.add_argument("--chunks-per-step", type=int, default=7)
    p.add_argument("--calls", type=int, default=15)
    return p.parse_args(argv)


def runner_for(hybrid, chunks_per_step: int, capture_invariants: bool):
    runner = rc.stream(hybrid, chunks_per_step=chunks_per_step)
    runner._steps.graphs = StubbedReplays()
    if not capture_invariants:  # the invariant program's capture refused: it runs op by op
        capture = runner._steps._capture
        runner._steps._capture = lambda what, make: None if "invariant" in what else capture(what, make)
    return runner


def host_ms(runner, args, kwargs, calls: int) -> list[float]:
    with torch.no_grad():
        runner(*args, **kwargs)      # captures
        runner(*args, **kwargs)      # a later call: the invariant program's graph is captured here
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            runner(*args, **kwargs)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None):
    a = parse_args(argv)
    from rehyat_compile.zoo import make_wan_1_3b, wan_1_3b_inputs
    model = make_wan_1_3b(layers=a.layers, device="cpu", dtype=torch.bfloat16)
    args, kwargs = wan_1_3b_inputs(a.frames, height=4, width=4, text_tokens=16, device="cpu", dtype=torch.bfloat16)
    hybrid = rc.transform(model, args, kwargs, chunk_frames=3, overlap_frames=1).to(torch.bfloat16)
    print(f"Wan2.1-1.3B blocks x {a.layers}, {a.frames} latent frames, G={a.chunks_per_step}, replays stubbed; "
          f"ms of host work per call over {a.calls} calls")
    rows = {}
    for name, capture in (("invariants captured", True), ("invariants op by op", False)):
        times = host_ms(runner_for(hybrid, a.chunks_per_step, capture), args, kwargs, a.calls)
        rows[name] = (min(times), statistics.median(times))
        print(f"  {name:22s} min {rows[name][0]:7.1f}  median {rows[name][1]:7.1f}")
    ratio = rows["invariants op by op"][1] / rows["invariants captured"][1]
    print(f"  op by op / captured (medians): {ratio:.2f}x")

    def by_parameters():
        return tuple(t.data_ptr() for t in (*hybrid.parameters(), *hybrid.buffers()))

    old = min(timeit.repeat(by_parameters, number=20, repeat=3)) / 20 * 1e3
    new = min(timeit.repeat(lambda: weight_addresses(hybrid), number=20, repeat=3)) / 20 * 1e3
    print(f"weights' addresses ({len(weight_addresses(hybrid))} tensors): parameters() {old:.2f} ms, "
          f"weight_addresses {new:.2f} ms ({old / new:.2f}x)")
    return rows


if __name__ == "__main__":
    main()
