"""Time rc.transform on a Wan2.1-1.3B-sized transformer on the meta device (no weights, no compute).

Usage: .venv/bin/python scripts/meta_transform_time.py [frames]
Wan2.1-T2V-1.3B config: 30 layers, 12 heads x 128, ffn 8960; 480x832 video -> latent 21 x 60 x 104.
"""
import sys
import time

import torch
from diffusers import WanTransformer3DModel

import rehyat_compile as rc


def main(frames: int = 21) -> None:
    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                      num_layers=30).eval()
        x = torch.randn(1, 16, frames, 60, 104)
        text = torch.randn(1, 512, 4096)
        t = torch.tensor([500])
    kwargs = dict(timestep=t, encoder_hidden_states=text, return_dict=False)
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
