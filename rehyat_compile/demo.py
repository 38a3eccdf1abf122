"""``rehyat-compile demo``: the whole pipeline on the embedded tiny Wan2.1 model.

Builds a tiny Wan2.1 T2V DiT from a diffusers config with fixed seeds, inspects it, converts it,
proves exactness with one chunk covering the video, distils briefly, streams it and compares,
computes the symbolic cost and checks linearity (plot written), builds for cpu, adreno and
hexagon and verifies each on its emulator, then prints a one-screen summary. Every number in the
summary is measured in this run; outputs go to ``out_dir``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

FRAMES, CHUNK, OVERLAP = 5, 2, 1


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
    model, args, kwargs = zoo.make_wan_t2v(frames=FRAMES)
    summary: dict = {"model": "wan2.1-tiny (diffusers WanTransformer3DModel, random weights)",
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

    def distill_step():
        batches = [((a * (1 - lvl) + lvl * torch.randn_like(a),) + tuple(args[1:]), kwargs)
                   for a in args[:1] for lvl in (0.2, 0.5, 0.8)]
        rep = rc.distill(model, hybrid, batches, steps=60, lr=2e-2, progress=False)
        with torch.no_grad():
            after = _rel(hybrid(*args, **kwargs), reference)
        summary["distilled_rel_error"] = after
        rc.save_hybrid(hybrid, out_dir / "hybrid")
        return rep, f"model error vs original {summary['converted_rel_error']:.3f} -> {after:.3f}"
    steps.run("distill phi (60 steps)", distill_step)
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
        from .costplot import cost_rows, plot_cost_vs_duration
        original, converted = rc.cost(model, args, kwargs), rc.cost(hybrid, args, kwargs)
        rejected = False
        try:
            rc.check_linear(original)
        except rc.ComplexityError:
            rejected = True
        rc.check_linear(converted)
        rows = cost_rows(original, converted, (5, 11, 21, 41, 61))
        plot_cost_vs_duration(rows, out_dir / "cost.png", title="tiny Wan2.1: original vs converted")
        summary.update(cost_degree_original=original.degree("flops"), cost_degree_converted=converted.degree("flops"),
                       original_rejected=rejected, cost_rows=rows)
        return converted, (f"FLOPs degree in T: {original.degree('flops')} -> {converted.degree('flops')}; "
                           f"check_linear rejects original: {rejected}; plot cost.png")
    steps.run("symbolic cost + linearity", cost_step)

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
