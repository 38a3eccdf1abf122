"""Tiny diffusers 0.42.1 video transformers, built from config with random weights (no hub).

Each factory ``make_<name>(frames=5)`` returns ``(model, args, kwargs)`` with fixed seeds: 2 layers
(or the fewest the model allows), 2 heads x 16 head dim, ``frames`` latent frames of an 8x8 latent
at spatial patch 2 (4x4 = 16 tokens per frame), 7 text tokens. ``MODELS`` maps a short name to its
factory; ``VIDEO_SHAPE`` gives the (frames, h, w) token grid for models whose export cannot make the
frame axis symbolic (the user's ``video_shape``); ``EXPECTED`` says what inspect must find.
Shared by the tests, ``scripts/supported_models.py``, the benchmarks and the CLI's presets
(``PRESETS``: ``wan2.1-tiny`` and every tiny model as ``<name>-tiny``, plus ``wan2.1-1.3b-meta``,
the paper-scale Wan2.1-T2V-1.3B on the meta device, no weights anywhere).
"""
from __future__ import annotations

import torch

HEADS, HEAD_DIM, TEXT, LATENT, CH = 2, 16, 7, 8, 4
INNER = HEADS * HEAD_DIM


def _seeded(cls, **config):
    torch.manual_seed(0)
    return cls(**config).eval()


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _video(frames, channels=CH, channels_first=True, seed=1):
    shape = (1, channels, frames, LATENT, LATENT) if channels_first else (1, frames, channels, LATENT, LATENT)
    return _randn(*shape, seed=seed)


def _wan_config(**extra):
    return dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CH,
                out_channels=CH, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64, **extra)


def make_wan_t2v(frames=5):
    from diffusers import WanTransformer3DModel
    model = _seeded(WanTransformer3DModel, **_wan_config())
    return model, (_video(frames),), dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          return_dict=False)


def make_wan_i2v(frames=5):
    """Wan2.1 I2V: image tokens join the cross-attention keys (added_kv_proj), video input has 2x channels."""
    from diffusers import WanTransformer3DModel
    model = _seeded(WanTransformer3DModel, **{**_wan_config(image_dim=24, added_kv_proj_dim=INNER), "in_channels": 2 * CH})
    return model, (_video(frames, 2 * CH),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        encoder_hidden_states_image=_randn(1, 5, 24, seed=3), return_dict=False)


def make_wan_vace(frames=5):
    from diffusers import WanVACETransformer3DModel
    model = _seeded(WanVACETransformer3DModel, **_wan_config(vace_layers=[0, 1], vace_in_channels=6))
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        control_hidden_states=_video(frames, 6, seed=4), control_hidden_states_scale=torch.ones(2), return_dict=False)


def make_skyreels_v2(frames=5):
    from diffusers import SkyReelsV2Transformer3DModel
    model = _seeded(SkyReelsV2Transformer3DModel, **_wan_config())
    return model, (_video(frames),), dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          return_dict=False)


def make_helios(frames=5):
    """Helios: short-history latents are concatenated before the video tokens (joint sequence)."""
    from diffusers import HeliosTransformer3DModel
    model = _seeded(HeliosTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, in_channels=CH, out_channels=CH, text_dim=32, freq_dim=32, ffn_dim=64,
                    num_layers=2, rope_dim=(4, 6, 6))
    history = 2
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        indices_latents_history_short=torch.arange(history).unsqueeze(0),
        latents_history_short=_video(history, seed=5), return_dict=False)


def _cogvideox(frames, patch_t, rotary):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    model = _seeded(CogVideoXTransformer3DModel, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                    in_channels=CH, out_channels=CH, time_embed_dim=32, text_embed_dim=32, num_layers=2,
                    sample_width=LATENT, sample_height=LATENT, sample_frames=(frames - 1) * 4 + 1, patch_size=2,
                    patch_size_t=patch_t, max_text_seq_length=TEXT, use_rotary_positional_embeddings=rotary,
                    use_learned_positional_embeddings=False)
    kwargs = dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2), return_dict=False)
    if rotary:
        token_frames = frames // (patch_t or 1)
        kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (LATENT // 2, LATENT // 2)),
                                                             (LATENT // 2, LATENT // 2), token_frames)
    return model, (_video(frames, channels_first=False),), kwargs


def make_cogvideox(frames=5):
    """CogVideoX 1.0 (2B-style: sincos positions, text tokens before the video in one sequence)."""
    return _cogvideox(frames, None, False)


def make_cogvideox_1_5(frames=6):
    """CogVideoX 1.5: temporal patch 2 and 3-D RoPE given as an input (static export + video_shape)."""
    return _cogvideox(frames, 2, True)


def make_hunyuan_video(frames=5):
    from diffusers import HunyuanVideoTransformer3DModel
    model = _seeded(HunyuanVideoTransformer3DModel, in_channels=CH, out_channels=CH, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                    patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=24,
                    rope_axes_dim=(4, 6, 6))
    mask = torch.ones(1, TEXT, dtype=torch.long)
    mask[:, -2:] = 0  # padded text tokens: the key mask on extra tokens must survive the rewrite
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2), encoder_attention_mask=mask,
        pooled_projections=_randn(1, 24, seed=3), guidance=torch.tensor([3500.0]), return_dict=False)


def make_mochi(frames=5):
    from diffusers import MochiTransformer3DModel
    model = _seeded(MochiTransformer3DModel, patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                    num_layers=2, pooled_projection_dim=16, in_channels=CH, text_embed_dim=32, time_embed_dim=16,
                    max_sequence_length=TEXT)
    return model, (_video(frames),), dict(
        encoder_hidden_states=_randn(1, TEXT, 32, seed=2), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long), return_dict=False)


def make_ltx_video(frames=5):
    """LTX-Video takes pre-patchified tokens [B, N, C] and (frames, height, width) as ints: static export."""
    from diffusers import LTXVideoTransformer3DModel
    model = _seeded(LTXVideoTransformer3DModel, in_channels=CH, out_channels=CH, patch_size=1, patch_size_t=1,
                    num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=INNER, num_layers=2,
                    caption_channels=32)
    side = LATENT // 2
    return model, (_randn(1, frames * side * side, CH),), dict(
        encoder_hidden_states=_randn(1, TEXT, 32, seed=2), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long), num_frames=frames, height=side, width=side,
        return_dict=False)


def make_allegro(frames=5):
    from diffusers import AllegroTransformer3DModel
    model = _seeded(AllegroTransformer3DModel, patch_size=2, patch_size_t=1, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, in_channels=CH, out_channels=CH, num_layers=2,
                    cross_attention_dim=INNER, sample_height=LATENT, sample_width=LATENT, sample_frames=frames,
                    caption_channels=32)
    return model, (_video(frames),), dict(encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          timestep=torch.tensor([500]), return_dict=False)


def make_easyanimate(frames=5):
    from diffusers import EasyAnimateTransformer3DModel
    model = _seeded(EasyAnimateTransformer3DModel, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                    in_channels=CH, out_channels=CH, patch_size=2, sample_width=LATENT, sample_height=LATENT,
                    num_layers=2, mmdit_layers=2, time_embed_dim=32, text_embed_dim=32)
    return model, (_video(frames),), dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          return_dict=False)


def make_cosmos(frames=5):
    """Cosmos 1.0 (padding-mask concat off: it needs torchvision's resize)."""
    from diffusers import CosmosTransformer3DModel
    model = _seeded(CosmosTransformer3DModel, in_channels=CH, out_channels=CH, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, num_layers=2, mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8,
                    max_size=(16, 16, 16), patch_size=(1, 2, 2), concat_padding_mask=False,
                    extra_pos_embed_type="learnable")
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2), return_dict=False)


def make_sana_video(frames=5):
    """SanaVideo: ReLU linear self-attention -- there is no softmax to convert; must be declined."""
    from diffusers import SanaVideoTransformer3DModel
    model = _seeded(SanaVideoTransformer3DModel, in_channels=CH, out_channels=CH, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, num_layers=2, num_cross_attention_heads=HEADS,
                    cross_attention_head_dim=HEAD_DIM, cross_attention_dim=INNER, caption_channels=32,
                    sample_size=LATENT, patch_size=(1, 2, 2), rope_max_seq_len=64)
    return model, (_video(frames),), dict(encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          timestep=torch.tensor([500]), return_dict=False)


MODELS = {
    "wan2.1-t2v": make_wan_t2v,
    "wan2.1-i2v": make_wan_i2v,
    "wan-vace": make_wan_vace,
    "skyreels-v2": make_skyreels_v2,
    "helios": make_helios,
    "cogvideox-1.0": make_cogvideox,
    "cogvideox-1.5": make_cogvideox_1_5,
    "hunyuan-video": make_hunyuan_video,
    "mochi": make_mochi,
    "ltx-video": make_ltx_video,
    "allegro": make_allegro,
    "easyanimate": make_easyanimate,
    "cosmos": make_cosmos,
    "sana-video": make_sana_video,
}


# ---- further diffusers 0.42.1 video transformers ---------------------------------------------

def make_chronoedit(frames=5):
    from diffusers import ChronoEditTransformer3DModel
    model = _seeded(ChronoEditTransformer3DModel, **_wan_config())
    return model, (_video(frames),), dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          return_dict=False)


def make_anyflow(frames=5):
    from diffusers import AnyFlowTransformer3DModel
    config = _wan_config()
    config.pop("rope_max_seq_len")
    model = _seeded(AnyFlowTransformer3DModel, **config)
    return model, (_video(frames, channels_first=False),), dict(
        timestep=torch.full((1, frames), 500), r_timestep=torch.full((1, frames), 400),
                                          encoder_hidden_states=_randn(1, TEXT, 32, seed=2), return_dict=False)


def make_consisid(frames=5):
    """ConsisID (CogVideoX-based identity-preserving video), face branch off."""
    from diffusers import ConsisIDTransformer3DModel
    model = _seeded(ConsisIDTransformer3DModel, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CH,
                    out_channels=CH, time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=LATENT,
                    sample_height=LATENT, sample_frames=(frames - 1) * 4 + 1, patch_size=2, max_text_seq_length=TEXT)
    return model, (_video(frames, channels_first=False),), dict(
        encoder_hidden_states=_randn(1, TEXT, 32, seed=2), timestep=torch.tensor([500]), return_dict=False)


def make_hunyuan_video_framepack(frames=5):
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    model = _seeded(HunyuanVideoFramepackTransformer3DModel, in_channels=CH, out_channels=CH,
                    num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1,
                    num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=24,
                    rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=24,
                    has_clean_x_embedder=True)
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long), pooled_projections=_randn(1, 24, seed=3),
        image_embeds=_randn(1, 3, 24, seed=4), indices_latents=torch.arange(frames),
        latents_clean=_video(2, seed=5), indices_latents_clean=torch.arange(2),
        latents_history_2x=_video(2, seed=6), indices_latents_history_2x=torch.arange(2),
        latents_history_4x=_video(4, seed=7), indices_latents_history_4x=torch.arange(4),
        guidance=torch.tensor([3500.0]), return_dict=False)


def make_motif_video(frames=5):
    from diffusers import MotifVideoTransformer3DModel
    model = _seeded(MotifVideoTransformer3DModel, in_channels=CH, out_channels=CH, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1,
                    text_embed_dim=32, rope_axes_dim=(4, 6, 6))
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long), return_dict=False)


def make_latte(frames=5):
    """Latte: factorised spatial + temporal attention (spatial-only is declined)."""
    from diffusers import LatteTransformer3DModel
    model = _seeded(LatteTransformer3DModel, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CH,
                    out_channels=CH, num_layers=1, sample_size=LATENT, patch_size=2, caption_channels=32,
                    cross_attention_dim=INNER, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                    video_length=frames)
    return model, (_video(frames),), dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
                                          return_dict=False)


MODELS.update({
    "chronoedit": make_chronoedit,
    "anyflow": make_anyflow,
    "consisid": make_consisid,
    "hunyuan-video-framepack": make_hunyuan_video_framepack,
    "motif-video": make_motif_video,
    "latte": make_latte,
})


def _fill_zero_weights(model, std=0.05):
    """Zero-initialised gates/modulations make the attention invisible in the output; give them values."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def make_kandinsky5(frames=5):
    """Kandinsky 5 video: channels-last latents [B, T, H, W, C] (time found at dim 1 from in_visual_dim)."""
    from diffusers import Kandinsky5Transformer3DModel
    model = _seeded(Kandinsky5Transformer3DModel, in_visual_dim=CH, in_text_dim=32, in_text_dim2=24, time_dim=32,
                    out_visual_dim=CH, patch_size=(1, 2, 2), model_dim=INNER, ff_dim=64, num_text_blocks=1,
                    num_visual_blocks=2, axes_dims=(4, 6, 6))
    _fill_zero_weights(model)
    side = LATENT // 2
    return model, (_randn(1, frames, LATENT, LATENT, CH),), dict(
        encoder_hidden_states=_randn(1, TEXT, 32, seed=2), timestep=torch.tensor([500.0]),
        pooled_projections=_randn(1, 24, seed=3),
        visual_rope_pos=[torch.arange(frames), torch.arange(side), torch.arange(side)],
        text_rope_pos=torch.arange(TEXT), return_dict=False)


def make_hunyuan_video_1_5(frames=5):
    """HunyuanVideo 1.5 (T2V: zero image embeddings). Not exportable: ``if torch.all(image_embeds == 0)``
    is python control flow on data, which torch.export cannot trace; captured through Dynamo instead
    (a graph break there), its attentions are declined: the mask ``m_i & m_j`` depends on the query."""
    from diffusers import HunyuanVideo15Transformer3DModel
    model = _seeded(HunyuanVideo15Transformer3DModel, in_channels=CH, out_channels=CH, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, num_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                    text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16, rope_axes_dim=(4, 6, 6),
                    target_size=64, task_type="t2v")
    return model, (_video(frames),), dict(
        timestep=torch.tensor([500.0]), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long), encoder_hidden_states_2=_randn(1, 5, 24, seed=3),
        encoder_attention_mask_2=torch.ones(1, 5, dtype=torch.long), image_embeds=torch.zeros(1, 3, 16),
        return_dict=False)


def make_anyflow_far(frames=5):
    """AnyFlow-FAR: causal FlexAttention (a BlockMask over chunk_partition) in its self-attention; exports
    only under torch.no_grad on CPU ("FlexAttention does not support backward on CPU"); declined."""
    from diffusers import AnyFlowFARTransformer3DModel
    partition = [1] + [2] * ((frames - 1) // 2) + ([1] if (frames - 1) % 2 else [])
    model = _seeded(AnyFlowFARTransformer3DModel, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                    in_channels=CH, out_channels=CH, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=1,
                    rope_max_seq_len=64, chunk_partition=tuple(partition))
    return model, (_video(frames, channels_first=False),), dict(
        timestep=torch.full((1, frames), 500.0), r_timestep=torch.full((1, frames), 400.0),
        encoder_hidden_states=_randn(1, TEXT, 32, seed=2), chunk_partition=partition, return_dict=False)


def make_kandinsky6_sr(frames=2):
    """Kandinsky 6 super-resolution: NABLA sparse attention through FlexAttention (a BlockMask from q/k
    statistics); channels-last [B, T, H, W, 2C+1] latents with an 8x8 token grid; declined."""
    from diffusers import Kandinsky6SRTransformer3DModel
    model = _seeded(Kandinsky6SRTransformer3DModel, in_visual_dim=CH, out_visual_dim=CH, time_dim=32,
                    patch_size=(1, 1, 1), model_dim=INNER, ff_dim=64, num_visual_blocks=1, axes_dims=(4, 6, 6))
    return model, (_randn(1, frames, 8, 8, 2 * CH + 1),), dict(timestep=torch.tensor([500.0]), return_dict=False)


MODELS.update({"kandinsky5": make_kandinsky5, "hunyuan-video-1.5": make_hunyuan_video_1_5,
               "anyflow-far": make_anyflow_far, "kandinsky6-sr": make_kandinsky6_sr})
FRAMES: dict = {}  # frames= for models whose time axis the default rule does not find (none at present)


def make_ltx2_video(frames=5):
    """LTX-2 audio-video: pre-patchified video and audio tokens, sizes as ints (static + video_shape)."""
    from diffusers import LTX2VideoTransformer3DModel
    model = _seeded(LTX2VideoTransformer3DModel, in_channels=CH, out_channels=CH, patch_size=1, patch_size_t=1,
                    num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=INNER,
                    audio_in_channels=CH, audio_out_channels=CH, audio_num_attention_heads=HEADS,
                    audio_attention_head_dim=HEAD_DIM, audio_cross_attention_dim=INNER, num_layers=2,
                    caption_channels=32)
    side = LATENT // 2
    audio = 6
    return model, (_randn(1, frames * side * side, CH),), dict(
        audio_hidden_states=_randn(1, audio, CH, seed=3), encoder_hidden_states=_randn(1, TEXT, 32, seed=2),
        audio_encoder_hidden_states=_randn(1, TEXT, 32, seed=4), timestep=torch.tensor([500.0]),
        encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long),
        audio_encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.long), num_frames=frames, height=side,
        width=side, audio_num_frames=audio, return_dict=False)


MODELS["ltx2-video"] = make_ltx2_video


# ---- paper scale: Wan2.1-T2V-1.3B ------------------------------------------------------------

WAN2_1_1_3B_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                          out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
"""diffusers config of Wan2.1-T2V-1.3B (dim 1536 = 12 heads x 128, 30 blocks, ffn 8960, text dim 4096)."""


def wan_1_3b_inputs(latent_frames=21, *, height=60, width=104, text_tokens=512, device="cpu", dtype=torch.float32):
    """Example inputs of Wan2.1-1.3B: 480x832 video -> 60x104 latent (1560 tokens per latent frame);
    81 video frames -> 21 latent frames."""
    gen = torch.Generator().manual_seed(1)
    if torch.device(device).type == "meta":
        x = torch.empty(1, 16, latent_frames, height, width, device=device, dtype=dtype)
        text = torch.empty(1, text_tokens, 4096, device=device, dtype=dtype)
    else:
        x = torch.randn(1, 16, latent_frames, height, width, generator=gen).to(device, dtype)
        text = torch.randn(1, text_tokens, 4096, generator=gen).to(device, dtype)
    return (x,), dict(timestep=torch.tensor([500], device=device), encoder_hidden_states=text, return_dict=False)


def make_wan_1_3b(*, layers=30, device="cpu", dtype=torch.float32):
    """Wan2.1-T2V-1.3B from its config, random weights (meta device: shapes only)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**{**WAN2_1_1_3B_CONFIG, "num_layers": layers})
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def make_wan_1_3b_meta(frames=21):
    return make_wan_1_3b(device="meta"), *wan_1_3b_inputs(frames, device="meta")


# ---- trained: a tiny Wan2.1 trained with flow matching on bouncing shapes ---------------------

BOUNCING_WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=3,
                           out_channels=3, text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4,
                           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
"""diffusers config of the trained tiny teacher: width 128 (4 heads x 32), 4 blocks, patch 1x2x2, RGB in
pixel space (16x16 pixels -> 8x8 = 64 tokens per frame), unconditional (null text of one token)."""

BOUNCING_WAN_WEIGHTS = "weights/wan_bouncing_shapes.safetensors"
"""Its weights, beside this file: trained by ``scripts/train_bouncing_teacher.py`` on the GPU machine."""


def bouncing_wan_weights_path():
    from pathlib import Path
    return Path(__file__).parent / BOUNCING_WAN_WEIGHTS


def make_wan_bouncing_untrained():
    """The teacher's architecture with the seeded random weights training starts from."""
    from diffusers import WanTransformer3DModel
    return _seeded(WanTransformer3DModel, **BOUNCING_WAN_CONFIG)


def bouncing_inputs(frames=8, *, batch=1, seed=1, s=0.5):
    """Example inputs: a bouncing-shapes video (seed) noised to flow time ``s``, null text."""
    from .bouncing_shapes import SIZE, bouncing_shapes
    from .flow_matching import noisy, null_text, wan_inputs
    x0 = bouncing_shapes(batch, seed, frames=frames)
    noise = _randn(*x0.shape, seed=seed + 1)
    times = torch.full((batch,), float(s))
    return wan_inputs(noisy(x0, noise, times), times, null_text(batch, BOUNCING_WAN_CONFIG["text_dim"]))


def make_wan_bouncing(frames=8):
    """The trained tiny Wan2.1 (bouncing shapes, flow matching), weights from the repository."""
    from safetensors.torch import load_file
    model = make_wan_bouncing_untrained()
    model.load_state_dict(load_file(bouncing_wan_weights_path()))
    return model.eval(), *bouncing_inputs(frames)


# ---- CLI presets and diffusers configs -------------------------------------------------------

PRESETS = {"wan2.1-tiny": make_wan_t2v, "wan2.1-1.3b-meta": make_wan_1_3b_meta,
           "wan2.1-bouncing": make_wan_bouncing,
           **{f"{name}-tiny": factory for name, factory in MODELS.items()}}


def _wan_inputs_from_config(config: dict, frames: int):
    patch_t, patch_h, patch_w = config.get("patch_size", (1, 2, 2))
    side = 4 * patch_h
    x = _randn(1, config.get("in_channels", 16), frames * patch_t, side, side)
    kwargs = dict(timestep=torch.tensor([500]), encoder_hidden_states=_randn(1, TEXT, config.get("text_dim", 4096),
                                                                            seed=2), return_dict=False)
    if config.get("image_dim"):
        kwargs["encoder_hidden_states_image"] = _randn(1, 5, config["image_dim"], seed=3)
    return (x,), kwargs


INPUT_BUILDERS = {"WanTransformer3DModel": _wan_inputs_from_config,
                  "SkyReelsV2Transformer3DModel": _wan_inputs_from_config}
"""diffusers classes whose example inputs can be made from their config alone."""


def from_diffusers_config(class_name: str, config: dict, frames: int | None = None):
    """(model, args, kwargs): ``diffusers.<class_name>.from_config(config)`` with random weights and
    example inputs (``frames`` latent frames of a 4x4-token latent) made from the config."""
    import diffusers
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"diffusers has no model class {class_name!r}")
    if class_name not in INPUT_BUILDERS:
        raise ValueError(f"no example-input builder for {class_name} from a config; supported: "
                         f"{', '.join(sorted(INPUT_BUILDERS))}. For other models pass module:factory returning "
                         "(model, args, kwargs)")
    check_config(cls, config)
    torch.manual_seed(0)
    model = cls.from_config(config).eval()
    return (model, *INPUT_BUILDERS[class_name](dict(model.config), 5 if frames is None else frames))


def check_config(cls, config) -> None:
    """TypeError naming the key when ``config`` is not a dict or a value does not have the type that
    ``cls.__init__`` annotates (JSON lists stand for tuples); keys ``cls`` does not take are left to
    diffusers (it ignores them with a warning, as for ``_class_name``)."""
    import inspect

    if not isinstance(config, dict):
        raise TypeError(f"config must be a JSON object of {cls.__name__}'s arguments (a dict), "
                        f"got {type(config).__name__}")
    parameters = inspect.signature(cls.__init__).parameters
    for key, value in config.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.annotation is inspect.Parameter.empty:
            continue
        if not _has_type(value, parameter.annotation):
            raise TypeError(f"config key {key!r} must be {_type_name(parameter.annotation)}, got {value!r}")


def _has_type(value, annotation) -> bool:
    """Whether a JSON value fits a type annotation (int, float, bool, str, None, unions, tuple/list
    of those); annotations it does not know accept anything."""
    import types
    import typing

    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, m) for m in members)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list) or annotation in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if not members or (len(members) == 2 and members[1] is Ellipsis):
            return not members or all(_has_type(v, members[0]) for v in value)
        if origin is tuple:
            return len(value) == len(members) and all(_has_type(v, m) for v, m in zip(value, members))
        return all(_has_type(v, members[0]) for v in value)
    return True


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation)
