"""Time rc.transform on a Wan2.1-1.3B-sized transformer on the meta device (no weights, no compute).

Usage: .venv/bin/python scripts/meta_transform_time.py [frames]
Wan2.1-T2V-1.3B config: 30 layers, 12 heads x 128, ffn 8960; 480x832 video -> latent 21 x 60 x 104.
"""
import sys
import time

import torch
import rehyat_compile as rc
from rehyat_compile import zoo


def main(frames: int = 21) -> None:
    model, (x,), kwargs = zoo.make_wan_1_3b_meta(frames)
    start, cpu = time.perf_counter(), time.process_time()
    ep, _ = rc.export_video_model(model, (x,), kwargs)
    export_wall, export_cpu = time.perf_counter() - start, time.process_time() - cpu
    del ep
    start, cpu = time.perf_counter(), time.process_time()
    hybrid = rc.transform(model, (x,), kwargs, chunk_frames=3, overlap_frames=1)
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - cpu
    site = hybrid.sites[0]
    print(f"export alone: {export_wall:.1f} s wall / {export_cpu:.1f} s CPU")
    print(f"transform: {elapsed:.1f} s wall / {elapsed_cpu:.1f} s CPU (export + passes + rewrite), "
          f"{len(hybrid.sites)} sites converted of {len(hybrid.report.sites)}, "
          f"tokens/frame {site.layout.tokens_per_frame}, frames {site.layout.frames}, "
          f"feature-map params {sum(p.numel() for p in hybrid.feature_maps.parameters())}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
