"""The HybridModel works as ``pipe.transformer`` in a diffusers pipeline (WanPipeline, no text encoder)."""
import pytest
import torch

import rehyat_compile as rc

from models import make_wan_t2v


def _run(transformer):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=text, negative_prompt_embeds=text, height=32, width=32, num_frames=9,
                num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.slow
def test_hybrid_runs_as_pipe_transformer_and_matches_with_one_chunk():
    model = make_wan_t2v()[0]
    reference = _run(model)
    lazy = rc.transform(model, chunk_frames=16)  # no example inputs: traced on the pipeline's first call
    assert torch.allclose(_run(lazy), reference, rtol=1e-4, atol=1e-5)
    chunked = _run(lazy.with_options(chunk_frames=1, overlap_frames=0))
    assert torch.isfinite(chunked).all() and not torch.allclose(chunked, reference, atol=1e-5)
