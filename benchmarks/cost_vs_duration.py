"""Cost of Wan2.1-1.3B vs video duration, original vs ReHyAt-converted, from rc.cost on the meta device.

    python benchmarks/cost_vs_duration.py [OUT.png] [--check-full]

Prints a table (FLOPs at 5 s and 10 s for 15/20/25/30 converted blocks x Tc in {1,2,3,5} x To in
{0,1}, memory traffic of one block at 121 frames) and writes a plot (default ./cost_vs_duration.png)
plus OUT.json with the numbers.

Method. Wan's 30 blocks are identical, and FLOPs and bytes are sums over graph nodes, so a model
with k of 30 blocks converted costs exactly  base + (30 - k) * block_original + k * block_converted,
where base = rc.cost of the model with 0 blocks (embeddings, head) and block_x = rc.cost of a 1-block
model minus base. That needs one 0-block, one 1-block original and eight 1-block converted exports
(a few seconds each) instead of 33 full 30-block ones. ``--check-full`` also costs the full 30-block
original and one full converted model and checks the composition against them exactly.
Peak memory of a mixed model is taken as the larger of the 1-block original / converted peaks.

Durations: Wan generates 16 fps, the VAE compresses time 4x: 16*s + 1 frames -> T = 4*s + 1 latent
frames (5 s = 81 frames = 21 latent frames; 121 frames = 31 latent frames).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sympy
import torch

import rehyat_compile as rc
from rehyat_compile.symbolic import T

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT_H, LATENT_W, TEXT_TOKENS = 60, 104, 512  # 480x832 video, VAE stride 8
TOKENS_PER_FRAME = (LATENT_H // 2) * (LATENT_W // 2)  # 1560 after the 2x2 spatial patch
FEATURE_DIM = 64  # rc.transform's default feature_dim
BLOCKS = WAN_1_3B["num_layers"]
CONVERTED = (15, 20, 25, 30)
CHUNKS = (1, 2, 3, 5)
OVERLAPS = (0, 1)
ADDITIVE = ("flops", "flops_elementwise", "bytes")


def latent_frames(seconds: float) -> int:
    """16 fps, 4x temporal VAE: 16*s + 1 frames -> 4*s + 1 latent frames."""
    return round(4 * seconds) + 1


def wan(num_layers: int = BLOCKS):
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        return WanTransformer3DModel(**{**WAN_1_3B, "num_layers": num_layers}).eval()


def wan_inputs(frames: int = 3) -> dict:
    with torch.device("meta"):
        return dict(hidden_states=torch.empty(1, 16, frames, LATENT_H, LATENT_W),
                    timestep=torch.zeros(1, dtype=torch.long),
                    encoder_hidden_states=torch.empty(1, TEXT_TOKENS, 4096), return_dict=False)


def convert(model, chunk_frames: int, overlap_frames: int, example: dict, blocks: int | None = None):
    """rc.transform of the self-attention of the first ``blocks`` blocks (all by default)."""
    layers = None if blocks is None else [f"blocks.{i}.attn1" for i in range(blocks)]
    return rc.transform(model, kwargs=example, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                        layers=layers, feature_dim=FEATURE_DIM)


def block_costs(attention: str = "fused") -> dict:
    """rc.cost of the 0-block model and of one original / converted block (that minus base).

    The example has 13 latent frames: the unfused ("math") hybrid op's decomposition guards on the
    number of chunks, so the example needs several chunks for the expressions to hold for long videos."""
    example = wan_inputs(13)
    base = rc.cost(wan(0), kwargs=example, attention=attention)
    one = rc.cost(wan(1), kwargs=example, attention=attention)

    def block(report):
        self_attention = [site for site in report.by_site.values() if site.module.endswith("attn1")]
        return {m: sympy.expand(report.metric(m) - base.metric(m)) for m in ADDITIVE} | {
            "peak_memory": report.peak_memory, "self_attention_bytes": sum(s.bytes for s in self_attention),
            "self_attention_core_flops": sum(c.flops for c in report.by_node.values() if c.site in
                                             {s.name for s in self_attention} and "attention" in c.target)}

    costs = {"base": {m: base.metric(m) for m in ADDITIVE}, "original": block(one)}
    for tc in CHUNKS:
        for to in OVERLAPS:
            if to <= tc:
                hybrid = convert(wan(1), tc, to, example)
                costs[(tc, to)] = block(rc.cost(hybrid, kwargs=example, attention=attention))
    return costs


def model_cost(costs: dict, metric: str, converted: int = 0, chunk=None):
    """Cost of the 30-block model with ``converted`` blocks converted at chunk = (Tc, To)."""
    if metric == "peak_memory":
        return costs["original"][metric] if converted == 0 else (
            costs[chunk][metric] if converted == BLOCKS else sympy.Max(costs["original"][metric], costs[chunk][metric]))
    blocks = costs["base"][metric] + (BLOCKS - converted) * costs["original"][metric]
    return sympy.expand(blocks + (converted * costs[chunk][metric] if converted else 0))


def value(expr, frames: int) -> float:
    return float(sympy.sympify(expr).subs(T, frames))


def flops_table(costs: dict) -> list[dict]:
    rows = []
    for seconds in (5, 10):
        t = latent_frames(seconds)
        original = value(model_cost(costs, "flops"), t)
        rows.append({"seconds": seconds, "T": t, "blocks": 0, "Tc": None, "To": None, "flops": original, "ratio": 1.0})
        for k in CONVERTED:
            for tc in CHUNKS:
                for to in OVERLAPS:
                    f = value(model_cost(costs, "flops", k, (tc, to)), t)
                    rows.append({"seconds": seconds, "T": t, "blocks": k, "Tc": tc, "To": to, "flops": f,
                                 "ratio": original / f})
    return rows


def traffic_per_block(fused: dict, math: dict, frames: int = 31) -> list[dict]:
    """Bytes moved by one block, and by its self-attention site alone, at ``frames`` latent frames."""
    rows = []
    for name, costs in (("fused", fused), ("math", math)):
        block, site = value(costs["original"]["bytes"], frames), value(costs["original"]["self_attention_bytes"], frames)
        for tc in CHUNKS:
            for to in OVERLAPS:
                b, a = value(costs[(tc, to)]["bytes"], frames), value(costs[(tc, to)]["self_attention_bytes"], frames)
                rows.append({"attention": name, "Tc": tc, "To": to, "block_original": block, "block_converted": b,
                             "block_ratio": block / b, "attn_original": site, "attn_converted": a,
                             "attn_ratio": site / a})
    return rows


def plot(fused: dict, math: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seconds = [s / 2 for s in range(1, 25)]
    frames = [latent_frames(s) for s in seconds]
    curves = [("original", 0, None)] + [(f"{k} blocks, Tc=3 To=1", k, (3, 1)) for k in CONVERTED] + [
        ("30 blocks, Tc=1 To=0", 30, (1, 0))]
    panels = [(fused, "flops", 1e12, "TFLOPs per forward", "FLOPs (matmul, attention)"),
              (math, "bytes", 1e12, "TB read + written per forward", "memory traffic, unfused attention"),
              (math, "peak_memory", 2**30, "GiB (fp32)", "peak activations, unfused attention")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (costs, metric, unit, ylabel, title) in zip(axes, panels):
        for label, k, chunk in curves:
            ax.plot(seconds, [value(model_cost(costs, metric, k, chunk), t) / unit for t in frames], label=label)
        ax.set(xlabel="video duration (s, 16 fps)", ylabel=ylabel, title=f"Wan2.1-1.3B 480x832: {title}")
        ax.axvline(5, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def check_full(costs: dict) -> dict:
    """Cost the full 30-block models and compare them with the block composition."""
    started = time.perf_counter()
    example = wan_inputs(13)
    full = rc.cost(wan(), kwargs=example)
    seconds_original = time.perf_counter() - started
    mixed = rc.cost(convert(wan(), 3, 1, example, blocks=15), kwargs=example)
    checks = {"full_original_seconds": seconds_original}
    for metric in ADDITIVE:
        checks[f"original_{metric}_exact"] = sympy.expand(full.metric(metric) - model_cost(costs, metric)) == 0
        checks[f"15blocks_{metric}_exact"] = sympy.expand(
            mixed.metric(metric) - model_cost(costs, metric, 15, (3, 1))) == 0
    return checks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="cost_vs_duration.png", help="PNG path (JSON next to it)")
    parser.add_argument("--check-full", action="store_true", help="also cost the full 30-block models")
    opts = parser.parse_args(argv)
    started = time.perf_counter()
    fused = block_costs("fused")
    math = block_costs("math")
    result = {"seconds_block_costs": time.perf_counter() - started,
              "flops": flops_table(fused), "traffic_per_block_121_frames": traffic_per_block(fused, math)}
    if opts.check_full:
        result["check_full"] = check_full(fused)

    print(f"Wan2.1-1.3B 480x832, {BLOCKS} blocks, text {TEXT_TOKENS}, phi features {FEATURE_DIM}")
    print(f"{'dur':>4} {'T':>3} {'blocks':>6} {'Tc':>3} {'To':>3} {'TFLOPs':>9} {'x fewer':>8}")
    for r in result["flops"]:
        print(f"{r['seconds']:>3}s {r['T']:>3} {r['blocks']:>6} {r['Tc'] or '-':>3} {r['To'] if r['To'] is not None else '-':>3} "
              f"{r['flops'] / 1e12:>9.1f} {r['ratio']:>8.2f}")
    print("\nGB moved at 121 frames (T=31) by one block and by its self-attention site, original vs converted:")
    print(f"{'attention':>9} {'Tc':>3} {'To':>3} {'block':>8} {'conv':>8} {'x less':>7} {'attn':>8} {'conv':>8} {'x less':>7}")
    for r in result["traffic_per_block_121_frames"]:
        print(f"{r['attention']:>9} {r['Tc']:>3} {r['To']:>3} {r['block_original'] / 1e9:>8.1f} "
              f"{r['block_converted'] / 1e9:>8.1f} {r['block_ratio']:>7.2f} {r['attn_original'] / 1e9:>8.1f} "
              f"{r['attn_converted'] / 1e9:>8.1f} {r['attn_ratio']:>7.2f}")
    t5 = latent_frames(5)
    total = value(model_cost(fused, "flops"), t5)
    core = BLOCKS * value(fused["original"]["self_attention_core_flops"], t5)
    result["flops_bound_5s"] = {"total": total, "self_attention_core": core, "bound": total / (total - core)}
    print(f"\nat 5 s: {total / 1e12:.1f} TFLOPs, of which self-attention softmax cores {core / 1e12:.1f}; even free "
          f"attention would save at most {total / (total - core):.2f}x")
    if opts.check_full:
        print("\nfull-model check:", result["check_full"])
    out = Path(opts.out)
    plot(fused, math, out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out} and {out.with_suffix('.json')} ({time.perf_counter() - started:.1f} s)")
    return result


if __name__ == "__main__":
    main()
