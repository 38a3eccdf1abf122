"""``rehyat-compile demo``: the whole pipeline on the embedded trained tiny Wan2.1 model.

Loads the tiny Wan2.1 DiT trained with flow matching on bouncing shapes (preset ``wan2.1-bouncing``,
weights in the package), inspects it, converts it, proves exactness with one chunk covering the
video, loads the feature maps distilled for it on an H200 (``benchmarks/fidelity.py --save-phi``),
samples videos from the teacher, the undistilled and the distilled conversion from the same noise
(``samples.gif``, ``samples.png``) and measures their fidelity (validation flow-matching loss, sample
error), streams it and compares, computes the symbolic cost of one Wan2.1-1.3B block on the meta
device (original vs converted vs streamed; ``cost.png``) and checks linearity, builds for cpu,
adreno and hexagon and verifies each on its emulator, then prints a one-screen summary. Every number
in the summary is measured in this run; outputs go to ``out_dir``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

FRAMES, CHUNK, OVERLAP = 8, 2, 1
SAMPLE_VIDEOS, SAMPLE_STEPS, VAL_BATCHES = 3, 12, 2
DISTILLED_PHI = "weights/wan_bouncing_phi_tc2_to1.safetensors"   # stage 1 at Tc=2, To=1 (H200)
COST_FRAMES = (6, 11, 21, 41, 81)


def _rel(a, b) -> float:
    a, b = _tensor(a).detach(), _tensor(b).detach()
    return float((a - b).norm() / b.norm())


def _tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return _tensor(out[0])
    return out.sample


class _Steps:
    """Collects (step, seconds, result line) and prints each as it finishes."""

    def __init__(self, console):
        self.console, self.rows, self.start = console, [], time.perf_counter()

    def run(self, name, fn):
        t0 = time.perf_counter()
        if self.console:
            with self.console.status(f"{name} ..."):
                value, line = fn()
        else:
            value, line = fn()
        seconds = time.perf_counter() - t0
        self.rows.append({"step": name, "seconds": round(seconds, 2), "result": line})
        if self.console:
            self.console.print(f"[green]✓[/] {name:<34} {seconds:6.1f} s  {line}")
        return value


def run_demo(out_dir: Path, console=None, hexagon: bool = True) -> dict:
    """Run every stage; returns the summary dict (also written to ``out_dir/summary.json``).
    ``hexagon=False`` leaves out the Hexagon build and its qemu-hexagon check (about half a
    minute)."""
    import rehyat_compile as rc
    from . import zoo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    steps = _Steps(console)
    model, args, kwargs = zoo.make_wan_bouncing(frames=FRAMES)
    summary: dict = {"model": "wan2.1-bouncing (diffusers WanTransformer3DModel trained with flow matching on "
                              "bouncing shapes, 16x16 RGB, 8 frames)",
                     "frames": FRAMES, "chunk_frames": CHUNK, "overlap_frames": OVERLAP}
    with torch.no_grad():
        reference = model(*args, **kwargs)

    def inspect_step():
        report = rc.inspect(model, args, kwargs)
        (out_dir / "inspect.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
        converted = [s for s in report.sites if s.rewritable]
        return report, f"{len(report.sites)} attention sites, {len(converted)} convertible"
    steps.run("inspect", inspect_step)

    hybrid = steps.run("transform (Tc=2, To=1)", lambda: _transform(rc, model, args, kwargs, reference, summary))

    def exact_step():
        # a sibling of the converted model: same export, one chunk covering the video
        whole = hybrid.with_options(chunk_frames=FRAMES, overlap_frames=0)
        with torch.no_grad():
            err = _rel(whole(*args, **kwargs), reference)
        summary["exact_rel_error"] = err
        if err > 1e-4:
            raise AssertionError(f"one chunk covering the video should equal the original; rel error {err:.2e}")
        return whole, f"Tc >= T equals the original: rel error {err:.1e}"
    steps.run("prove exactness (Tc >= T)", exact_step)

    def distilled_step():
        distilled = rc.load_hybrid(model, Path(zoo.__file__).parent / DISTILLED_PHI, args, kwargs)
        with torch.no_grad():
            after = _rel(distilled(*args, **kwargs), reference)
        summary["distilled_rel_error"] = after
        rc.save_hybrid(distilled, out_dir / "hybrid")
        return distilled, (f"pre-distilled phi (stage 1 on an H200): model error vs original "
                           f"{summary['converted_rel_error']:.3f} -> {after:.3f}")
    distilled = steps.run("load distilled phi", distilled_step)

    def samples_step():
        fidelity = sample_and_measure({"teacher": model, "converted": hybrid, "distilled": distilled}, out_dir)
        summary["fidelity"] = fidelity
        v = fidelity["val_loss"]
        e = fidelity["sample_rmse"]
        return fidelity, (f"val loss teacher {v['teacher']:.3f} / converted {v['converted']:.3f} / distilled "
                          f"{v['distilled']:.3f}; sample RMSE vs teacher {e['converted']:.3f} -> {e['distilled']:.3f}; "
                          "samples.gif, samples.png")
    steps.run(f"sample {SAMPLE_VIDEOS} videos x 3 models", samples_step)
    hybrid = distilled
    # The Hexagon job (single-threaded LLVM code generation, then qemu) runs in a second process
    # beside the remaining steps: both cores stay busy and the demo stays short.
    hexagon_job = _start_hexagon_job(hybrid, out_dir / "build-hexagon") if hexagon else None

    def stream_step():
        runner = rc.stream(hybrid)
        with torch.no_grad():
            err = _rel(runner(*args, **kwargs), hybrid(*args, **kwargs))
        nbytes = runner.state_nbytes(*args, **kwargs)
        summary.update(stream_rel_error=err, state_bytes=nbytes)
        if err > 1e-4:
            raise AssertionError(f"streamed output differs from the parallel form: rel error {err:.2e}")
        return runner, f"chunk by chunk == parallel: rel error {err:.1e}; state {nbytes / 1024:.1f} KiB"
    steps.run("stream", stream_step)

    def cost_step():
        rows, degrees, rejected = wan_1_3b_block_cost(rc)
        from .costplot import plot_cost_series
        plot_cost_series(rows, out_dir / "cost.png",
                         title="one Wan2.1-1.3B block (meta device, 480x832, attention unfused as on phone GPUs; "
                               "Tc=3, To=1)")
        summary.update(cost_degree_original=degrees["original"], cost_degree_converted=degrees["converted"],
                       original_rejected=rejected, cost_rows=rows)
        at = {r["T"]: r for r in rows}[21]
        return rows, (f"Wan2.1-1.3B block, FLOPs degree in T {degrees['original']} -> {degrees['converted']}; at 21 "
                      f"latent frames {at['original_flops'] / 1e12:.1f} -> {at['converted_flops'] / 1e12:.1f} TFLOPs, "
                      f"peak {at['original_peak_memory'] / 2**30:.2f} -> streamed "
                      f"{at['streamed_peak_memory'] / 2**30:.2f} GiB; cost.png")
    steps.run("symbolic cost + linearity (1.3B block)", cost_step)

    builds = {}
    try:
        for target, verify in (("cpu", _verify_cpu), ("adreno", _verify_adreno)):
            def build_step(target=target, verify=verify):
                art = rc.build(hybrid, args, kwargs, target=target, out_dir=out_dir / f"build-{target}")
                builds[target] = verify(art, hybrid, args, kwargs)
                return art, f"{target}: {builds[target]}"
            steps.run(f"build + verify {target}", build_step)
        if hexagon_job is not None:
            def hexagon_step():
                builds["hexagon"] = hexagon_job.result()
                return None, f"hexagon: {builds['hexagon']}"
            steps.run("build + verify hexagon", hexagon_step)
        else:
            builds["hexagon"] = "skipped (--no-hexagon)"
    finally:
        if hexagon_job is not None:
            hexagon_job.cancel()
    summary["builds"] = builds
    summary["steps"] = steps.rows
    summary["total_seconds"] = round(time.perf_counter() - steps.start, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if console:
        console.print(f"\n[bold]demo finished in {summary['total_seconds']} s[/]; outputs in {out_dir}/")
    return summary


def sample_and_measure(models: dict, out_dir: Path) -> dict:
    """Sample ``SAMPLE_VIDEOS`` videos from every model from the same noise (``SAMPLE_STEPS`` Euler
    steps), write them side by side (``samples.gif``, ``samples.png``), and measure each model's
    validation flow-matching loss (``VAL_BATCHES`` batches of held-out videos, fixed noise) and the RMS
    difference of its samples from the teacher's, overall and per frame."""
    from . import zoo
    from .bouncing_shapes import bouncing_shapes
    from .flow_matching import euler_sample, validation_batches, validation_loss, wan_velocity
    from .videos import write_gif, write_strip
    text_dim = zoo.BOUNCING_WAN_CONFIG["text_dim"]
    noise = torch.randn(SAMPLE_VIDEOS, 3, FRAMES, 16, 16, generator=torch.Generator().manual_seed(7))
    val = validation_batches(bouncing_shapes(SAMPLE_VIDEOS * VAL_BATCHES, 10_000_019, frames=FRAMES), 10_000_020,
                             SAMPLE_VIDEOS)  # batch = SAMPLE_VIDEOS: one input structure, one export
    samples = {name: euler_sample(wan_velocity(m, text_dim), noise, SAMPLE_STEPS).clamp(-1, 1)
               for name, m in models.items()}
    write_gif(samples, out_dir / "samples.gif")
    write_strip(samples, out_dir / "samples.png")
    teacher = samples["teacher"]
    diff = {name: (x - teacher) for name, x in samples.items() if name != "teacher"}
    return {"val_loss": {name: validation_loss(wan_velocity(m, text_dim), val) for name, m in models.items()},
            "sample_rmse": {name: float(d.pow(2).mean().sqrt()) for name, d in diff.items()},
            "sample_rmse_per_frame": {name: d.pow(2).mean(dim=(0, 1, 3, 4)).sqrt().tolist() for name, d in diff.items()},
            "sample_steps": SAMPLE_STEPS, "videos": SAMPLE_VIDEOS}


def wan_1_3b_block_cost(rc, chunk_frames: int = 3, overlap_frames: int = 1):
    """Symbolic cost of one Wan2.1-1.3B block (the paper-scale model's unit; meta device, no weights)
    as the original, the converted whole-video graph and the streamed step graph, with attention
    unfused (the score matrix in memory, as on phone GPUs). Returns (rows per T in COST_FRAMES,
    FLOPs degrees, whether check_linear rejects the original)."""
    from . import zoo
    from .costplot import METRICS
    model = zoo.make_wan_1_3b(layers=1, device="meta")
    args, kwargs = zoo.wan_1_3b_inputs(6, device="meta")
    original = rc.cost(model, args, kwargs, attention="math")
    hybrid = rc.transform(model, args, kwargs, chunk_frames=chunk_frames, overlap_frames=overlap_frames)
    converted = rc.cost(hybrid, args, kwargs, attention="math")
    step, example = rc.stream(hybrid).step_module(*args, **kwargs)
    streamed = rc.cost(step, example, chunk_frames=chunk_frames, attention="math")
    rejected = False
    try:
        rc.check_linear(original)
    except rc.ComplexityError:
        rejected = True
    rc.check_linear(converted)
    rows = []
    for t in COST_FRAMES:
        row = {"T": t}
        for kind, report in (("original", original), ("converted", converted), ("streamed", streamed)):
            values = report.evaluate(T=t)
            row.update({f"{kind}_{m}": float(values[m]) for m in METRICS})
        rows.append(row)
    return rows, {"original": original.degree("flops"), "converted": converted.degree("flops")}, rejected


def _verify_cpu(art, hybrid, args, kwargs) -> str:
    """The x86 library runs here: compare with PyTorch (fp32, tolerance 1e-4 relative)."""
    with torch.no_grad():
        err = _rel(art(*args, **kwargs), hybrid(*args, **kwargs))
    if err > 1e-4:
        raise AssertionError(f"cpu build differs from PyTorch: rel error {err:.2e}")
    return f"runs here, rel error vs PyTorch {err:.1e}"


def _verify_adreno(art, hybrid, args, kwargs) -> str:
    """Every OpenCL kernel of the Adreno build runs on PoCL and is compared with the same kernel
    compiled for x86 (tolerance 1e-4 absolute on N(0,1) inputs)."""
    from .backends import opencl_check
    from .backends.portable import flat_program, portable_program
    from .backends.tvm import relax_module
    try:
        opencl_check.opencl_context()
    except Exception as err:  # no OpenCL platform (PoCL not installed)
        return f"built; kernels not run: no OpenCL platform ({err})"
    results = opencl_check.check_kernels(relax_module(flat_program(portable_program(hybrid, args, kwargs), args,
                                                                   kwargs)))
    ran = [r for r in results if r.status == "ok"]
    matching = [r for r in ran if r.max_abs_error <= 1e-4]
    line = f"{len(matching)}/{len(results)} OpenCL kernels run on PoCL and match x86 within 1e-4"
    skipped = sorted({r.reason for r in results if r.status == "skipped"})
    if skipped:
        line += f" ({sum(r.status == 'skipped' for r in results)} not run: {'; '.join(skipped)})"
    differing = [f"{r.function} ({r.max_abs_error:.1e})" for r in ran if r.max_abs_error > 1e-4]
    return line + (f"; DIFFER: {', '.join(differing)}" if differing else "")


class _SiteAttention(torch.nn.Module):
    """One converted site alone (its phi maps and the hybrid op): few kernels, so the Hexagon
    code generator (seconds per kernel) stays inside the demo's time."""

    def __init__(self, maps, site):
        super().__init__()
        self.maps, self.layout = maps, dict(tokens_per_frame=site.video[2], chunk_frames=site.chunk_frames,
                                            overlap_frames=site.overlap_frames, scale=site.scale)

    def forward(self, q, k, v):
        import rehyat_compile as rc
        return rc.hybrid_attention(q, k, v, self.maps.phi_q(q), self.maps.phi_k(k), **self.layout)


def _start_hexagon_job(hybrid, out_dir: Path):
    """A future of :func:`hexagon_site`'s summary line for the first converted site, run in a fresh
    (spawned) process; the site's module and example inputs are what crosses over."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    site = hybrid.sites[0]
    maps = next(iter(hybrid.feature_maps.values()))
    frames, tokens = site.video[1], site.video[2]
    q, k, v = (torch.randn(1, site.heads, frames * tokens, site.head_dim) for _ in range(3))
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_quiet_worker)
    future = pool.submit(hexagon_site, _SiteAttention(maps, site).eval(), (q, k, v), site.name, out_dir)
    pool.shutdown(wait=False)
    return future


def _quiet_worker() -> None:
    """The worker's own warnings (pytree deprecations while unpickling the site) would interleave
    with the demo's lines."""
    import warnings
    warnings.simplefilter("ignore", FutureWarning)


def hexagon_site(attention, inputs, site_name: str, out_dir: Path) -> str:
    """One converted site built for Hexagon v75 (its object must disassemble to HVX code),
    and the same kernels built as v66 code, run under qemu-hexagon and compared with x86
    (``hexagon_check.TOLERANCE`` of the output scale). The site alone keeps the Hexagon code
    generation (about half a second per kernel on 2 cores) inside the demo's time."""
    import rehyat_compile as rc
    from .backends import hexagon_check, verify
    from .backends.portable import flat_program, portable_program
    from .backends.tvm import relax_module
    started = time.perf_counter()
    torch.set_num_threads(1)  # the other core builds cpu and adreno meanwhile
    art = rc.build(attention, inputs, target="hexagon", out_dir=out_dir, target_options={"versions": ("v75",)})
    files = art.manifest["entries"]["main"]["files"]
    parts = [f"site {site_name}: v75 .so (ELF {verify.elf_machine(out_dir / files['library_v75'])})"]
    try:
        hvx = verify.hexagon_disassembly(out_dir / files["object_v75"], "v75").count("vmem(")
        parts.append(f"{hvx} HVX vector loads/stores in its disassembly")
    except verify.ToolMissing as missing:
        parts.append(f"not disassembled ({missing})")
    try:
        results = hexagon_check.check_on_qemu(relax_module(flat_program(portable_program(attention, inputs), inputs)))
    except verify.ToolMissing as missing:
        parts.append(f"v66 kernels not run ({missing})")
    else:
        parts.append(hexagon_check.summary(results))
        failing = [r.function for r in results if not hexagon_check.matches(r)]
        if failing:
            raise AssertionError(f"Hexagon v66 kernels differ from x86 under qemu-hexagon: {', '.join(failing)}")
    parts.append(f"{time.perf_counter() - started:.0f} s in its own process")
    return "; ".join(parts)


def _transform(rc, model, args, kwargs, reference, summary):
    hybrid = rc.transform(model, args, kwargs, chunk_frames=CHUNK, overlap_frames=OVERLAP)
    with torch.no_grad():
        out = hybrid(*args, **kwargs)
    err = _rel(out, reference)
    if not torch.isfinite(_tensor(out)).all():
        raise AssertionError("converted model produced non-finite values")
    summary["converted_rel_error"] = err
    return hybrid, f"{len(hybrid.sites)} sites converted; rel error before distillation {err:.3f}"
