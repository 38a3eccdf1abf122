"""One denoising step of diffusers Wan2.1-1.3B: original vs converted vs streamed, side by side.

The model is built from its config with random bf16 weights (no hub): dim 1536, 12 heads x 128,
30 blocks, ffn 8960, text dim 4096, patch 1x2x2, 480x832 video (latent 60x104, 1560 tokens per
latent frame). Converted: every self-attention, Tc=3, To=1. Streamed: the converted model run
chunk by chunk (rc.stream: fused Triton step, chunk-invariant work hoisted, CUDA graphs on CUDA).

Per video length it prints the time per step and peak memory of each form, and the streamed output's
error against the converted one from the same run (bf16 tolerance: relative L2 error <= 2e-2; both
forms compute one function, docs/hybrid_attention.md, and differ by bf16 rounding only). At the
``--profile-frames`` lengths a torch.profiler pass gives each form's kernel launches per step (CUDA
runtime launch calls, a CUDA graph replay counting one) and the GPU-busy fraction (union of kernel
intervals over the step's wall time). ``--compile`` adds torch.compile columns (original, converted,
streamed with ``rc.stream(..., compile=True)``), compared compiled with compiled. ``--chunks-per-step G [G2 ...]``
streams G chunks per step program (the same function, G chunks' activations in memory); each further
value adds an eager ``strmG`` form with its own ratios and error, measured in the same run. ``--stream-only``
lengths run only the streamed form and the original.

    python benchmarks/bench_wan_step.py                       # 81 121 161 321 frames, on the GPU
    python benchmarks/bench_wan_step.py --video-frames 81 --layers 2 --device cpu --height 16 --width 16
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time

import torch

import rehyat_compile as rc
from rehyat_compile.zoo import make_wan_1_3b, wan_1_3b_inputs

BF16_TOLERANCE = 2e-2  # relative L2 error of the streamed output against the converted one
_LAUNCH = re.compile(r"^(cuda|cu)(LaunchKernel|LaunchKernelEx|LaunchKernelExC|GraphLaunch|LaunchCooperativeKernel)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video-frames", type=int, nargs="+", default=[81, 121, 161, 321],
                   help="pixel frames; latent frames = (f - 1) / 4 + 1")
    p.add_argument("--stream-only", type=int, nargs="*", default=[],
                   help="pixel frames at which only the streamed form and the original run (long videos)")
    p.add_argument("--profile-frames", type=int, nargs="*", default=[81])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    p.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--chunks-per-step", type=int, nargs="+", default=[1],
                   help="chunks each streamed step program runs (rc.stream(..., chunks_per_step=G)); the first "
                        "is the strm column, each further G adds a strmG column (eager) with its s/c and error")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile columns (original, converted, streamed: rc.stream(..., compile=True))")
    p.add_argument("--only", nargs="*", default=None, help="run only these forms (orig conv strm orig+c conv+c strm+c)")
    p.add_argument("--profile-table", default=None, help="write each profiled form's top GPU kernels to this file")
    p.add_argument("--skip-original-above", type=int, default=10**9,
                   help="do not run the original model beyond this many pixel frames")
    p.add_argument("--memory-at-peak", type=int, nargs="*", default=[],
                   help="at these lengths, record each form's allocations (torch.cuda.memory history) and print "
                        "what was live at its peak and at its end, by the line of code that allocated it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_model(layers: int, device):
    return make_wan_1_3b(layers=layers, device=device, dtype=torch.bfloat16)


def inputs(video_frames: int, args, device):
    return wan_1_3b_inputs((video_frames - 1) // 4 + 1, height=args.height, width=args.width,
                           text_tokens=args.text_tokens, device=device, dtype=torch.bfloat16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats, kept: tuple = (0, 0), input_bytes: int = 0):
    """(median seconds, peak allocated bytes, first output, peak reserved bytes, bytes kept) of fn().

    Peaks count from what was allocated (reserved) just before the call, less ``input_bytes`` (the
    inputs, allocated already, count in the peak) and less ``kept``: the bytes
    (allocated, reserved) this form kept from its earlier calls (the stream's graph buffers and
    pools, captured at the first length). So a form's peak is the memory above the weights that it
    needs itself, at every length, and never the buffers other forms keep alive in the same run
    (several streams side by side each keep their own graphs). The first call warms up (Triton
    autotuning, CUDA graph capture) and is not timed. Reserved counts what allocated does not: a
    CUDA graph's private pool keeps the blocks its capture freed (they are written again by every
    replay). The last element is what this call left behind (allocated, reserved) besides its
    output, for the next call's ``kept``."""
    nan = float("nan")
    cuda = device.type == "cuda"
    with torch.no_grad():
        if cuda:
            _sync(device)
            torch.cuda.empty_cache()
            before = (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))
        try:
            first = fn()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return nan, nan, None, nan, kept
        first = first[0] if isinstance(first, (tuple, list)) else first
        _sync(device)
        if cuda:
            torch.cuda.empty_cache()  # the warm-up's cached blocks (eager runs before a capture) are not the form's
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            del out
    median = sorted(times)[len(times) // 2]
    if not cuda:
        return median, nan, first, nan, kept
    peak = torch.cuda.max_memory_allocated() - before[0] + kept[0] + input_bytes
    reserved = torch.cuda.max_memory_reserved() - before[1] + kept[1]
    torch.cuda.empty_cache()
    output = first.numel() * first.element_size()
    left = (torch.cuda.memory_allocated(device) - before[0] - output + kept[0],
            torch.cuda.memory_reserved(device) - before[1] + kept[1])
    return median, peak, first, reserved, left


def _union_ns(intervals) -> int:
    busy, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy


def profile(fn, device, table=None, title="") -> tuple[int, int, float]:
    """(launch calls, GPU kernels, GPU-busy fraction) of one call of fn() under torch.profiler;
    ``table``: a file to append the top GPU kernels to."""
    from torch.profiler import ProfilerActivity
    with torch.no_grad():
        fn()
        _sync(device)
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            wall = time.perf_counter() - t0
    launches, kernels = 0, []
    for e in prof.events():
        if _LAUNCH.match(e.name):
            launches += 1
        elif e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end))  # microseconds
    busy = _union_ns(kernels) * 1e-6 / wall if kernels else float("nan")
    if table is not None:
        with open(table, "a") as f:
            f.write(f"\n== {title}: wall {wall * 1e3:.1f} ms\n")
            f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
    return launches, len(kernels), busy


def allocation_site(frames) -> str:
    """The innermost stack frame outside torch's own Python files: the line of model, pass or runner code
    that asked for the memory ("?" when every frame is torch's)."""
    for f in frames:
        name = f.get("filename", "")
        if "/torch/" not in name and not name.startswith("<"):
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.get('line', 0)} {f.get('name', '')}"
    return "?"


def _by_site(blocks) -> dict:
    by_site: dict[str, tuple[int, int]] = {}
    for size, site in blocks:
        total, count = by_site.get(site, (0, 0))
        by_site[site] = (total + size, count + 1)
    return dict(sorted(by_site.items(), key=lambda kv: -kv[1][0]))


def live_at_peak(trace) -> tuple[int, dict, dict]:
    """(peak bytes, {allocation site: (bytes, blocks)} live at the peak, the same for what is still live
    at the trace's end) of a ``torch.cuda.memory._snapshot()`` device trace, counted from the trace's start:
    allocations made before it are not in it. An ``alloc`` event adds its block, ``free_completed``
    removes it (``free_requested`` is the stream-ordered request: the memory is not reusable until it
    completes)."""
    live, current, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = (event["size"], allocation_site(event.get("frames", [])))
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action == "free_completed" and addr in live:
            current -= live.pop(addr)[0]
    return peak, _by_site(at_peak.values()), _by_site(live.values())


class RecordedMemory:
    """Context: the CUDA allocator's history recorded inside it; on leaving, prints the peak above the
    start and the ``top`` allocation sites live at it, then those still live at the end (what the form
    keeps: graph buffers, static states)."""

    def __init__(self, title: str, top: int = 10):
        self.title, self.top = title, top

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=4_000_000)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, at_peak, at_end = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
        print(f"memory, {self.title}: peak {peak / 2**30:.2f} GiB above the start; live at the peak:")
        for site, (size, blocks) in list(at_peak.items())[:self.top]:
            print(f"  {size / 2**20:>9.1f} MiB {blocks:>5} blocks  {site}")
        print(f"  still live at the end: {sum(v[0] for v in at_end.values()) / 2**30:.2f} GiB")
        for site, (size, blocks) in list(at_end.items())[:self.top]:
            print(f"  {size / 2**20:>9.1f} MiB {blocks:>5} blocks  {site}")
        return False


def rel_error(out, ref) -> tuple[float, float]:
    """(relative L2, max abs) error of out against ref."""
    if out is None or ref is None:
        return float("nan"), float("nan")
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item(), (out - ref).abs().max().item()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.layers, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    example_args, example_kwargs = inputs(args.video_frames[0], args, device)
    t0 = time.perf_counter()
    hybrid = rc.transform(model, example_args, example_kwargs, chunk_frames=args.chunk_frames,
                          overlap_frames=args.overlap_frames)
    hybrid = hybrid.to(device=device, dtype=torch.bfloat16)
    print(f"transform of {len(hybrid.sites)} sites: {time.perf_counter() - t0:.1f} s")
    first_g, more_g = args.chunks_per_step[0], args.chunks_per_step[1:]
    runner = rc.stream(hybrid, chunks_per_step=first_g)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gib = 2**30
    print(f"device {name}; torch {torch.__version__}; Wan2.1-1.3B shapes, {args.layers} blocks, weights "
          f"{weights / gib:.2f} GiB bf16, Tc={args.chunk_frames} To={args.overlap_frames}, streamed "
          f"{first_g} chunk(s) per step (strmG: G per step); peak = GPU memory above "
          f"the weights that each form needs itself (inputs, outputs, working memory, the stream's state and graph buffers); strm/wts = (weights + streamed peak) / weights; strm* res = each stream's peak of reserved memory above the weights, GiB (its CUDA graphs' private pools, which allocated memory does not count, included); err = streamed vs converted, relative "
          f"L2 (bf16 tolerance {BF16_TOLERANCE:g}) and max abs")
    forms = {"orig": lambda a, kw: model(*a, **kw), "conv": lambda a, kw: hybrid(*a, **kw),
             "strm": lambda a, kw: runner(*a, **kw)}
    for g in more_g:
        forms[f"strm{g}"] = (lambda r: lambda a, kw: r(*a, **kw))(rc.stream(hybrid, chunks_per_step=g))
    if args.compile:
        compiled_model, compiled_hybrid = torch.compile(model), torch.compile(hybrid)
        compiled_runner = rc.stream(hybrid, compile=True, chunks_per_step=first_g)
        forms.update({"orig+c": lambda a, kw: compiled_model(*a, **kw), "conv+c": lambda a, kw: compiled_hybrid(*a, **kw),
                      "strm+c": lambda a, kw: compiled_runner(*a, **kw)})
    if args.only:
        forms = {k: (v if k in args.only else None) for k, v in forms.items()}
    kept = dict.fromkeys(forms, (0, 0))  # what each form keeps between calls (graph buffers), bytes
    pairs = [("", "orig", "conv", "strm")] + ([("c ", "orig+c", "conv+c", "strm+c")] if args.compile else [])
    pairs += [(f"G{g} ", "orig", "conv", f"strm{g}") for g in more_g]
    header = f"{'frames':>6} {'latent':>6} {'tokens':>7} " + " ".join(f"{k + ' ms':>9}" for k in forms)
    header += "".join(f" {p + 'conv x':>8} {p + 'strm x':>8} {p + 's/c':>6}" for p, *_ in pairs) + " "
    header += " ".join(f"{k + ' GiB':>10}" for k in forms)
    streams = [k for k in forms if k.startswith("strm")]
    print(header + f" {'strm/wts':>8}" + "".join(f" {k + ' res':>10}" for k in streams) + "".join(f" {p + 'err L2':>9} {p + 'err max':>9}" for p, *_ in pairs)
          + f" {'ok':>3}", flush=True)
    rows, profiles = [], {}
    for frames in args.video_frames + args.stream_only:
        a, kw = inputs(frames, args, device)
        latent = a[0].shape[2]
        tokens = latent * (args.height // 2) * (args.width // 2)
        input_bytes = sum(t.numel() * t.element_size() for t in [*a, *kw.values()] if isinstance(t, torch.Tensor))
        result = {}
        for key, fn in forms.items():
            skip = fn is None or (key.startswith("orig") and frames > args.skip_original_above) or \
                   (frames in args.stream_only and key != "orig" and not (key.startswith("strm") and "+" not in key))
            record = frames in args.memory_at_peak and not skip and device.type == "cuda"
            with RecordedMemory(f"{frames} frames {key} (first call and {args.repeats} more)") if record \
                    else contextlib.nullcontext():
                result[key] = (float("nan"), float("nan"), None, float("nan"), kept[key]) if skip else \
                    measure(lambda: fn(a, kw), device, args.repeats, kept[key], input_bytes)
            kept[key] = result[key][4]
            if frames in args.profile_frames and not skip:
                profiles[(frames, key)] = profile(lambda: fn(a, kw), device, args.profile_table, f"{frames} frames {key}")
        t = {k: v[0] for k, v in result.items()}
        m = {k: v[1] for k, v in result.items()}
        errs = [rel_error(result[s_][2], result[c][2]) for _, _, c, s_ in pairs]
        ok = all(e[0] <= BF16_TOLERANCE for e in errs if e[0] == e[0])
        line = f"{frames:>6} {latent:>6} {tokens:>7} " + " ".join(f"{t[k] * 1e3:>9.0f}" for k in forms)
        line += "".join(f" {t[o] / t[c]:>8.2f} {t[o] / t[s_]:>8.2f} {t[c] / t[s_]:>6.2f}" for _, o, c, s_ in pairs) + " "
        line += " ".join(f"{m[k] / gib:>10.2f}" for k in forms)
        line += f" {(weights + m['strm']) / weights:>8.2f}" + "".join(f" {result[k][3] / gib:>10.2f}" for k in streams) + "".join(f" {e[0]:>9.1e} {e[1]:>9.1e}" for e in errs)
        print(line + f" {'yes' if ok else 'NO':>3}", flush=True)
        rows.append((frames, t, m, errs))
        del a, kw, result
    if profiles:
        print("torch.profiler, one step: launches = CUDA launch calls (a graph replay is one), kernels = GPU kernels, "
              "busy = GPU-busy fraction of the step's wall time")
        for (frames, key), (launches, kernels, busy) in profiles.items():
            print(f"  {frames:>4} frames {key:>6}: {launches:>6} launches {kernels:>6} kernels  busy {busy:.2f}")
    return rows, profiles


if __name__ == "__main__":
    main()
