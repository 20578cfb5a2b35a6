"""Tiny diffusers models and pipelines from configs with random weights (no downloads), for the integration tests."""

from __future__ import annotations

import torch

TEXT_DIM = 32


def wan_transformer(seed: int = 0):
    """A 2-layer `WanTransformer3DModel` (2 heads of 16); 17 frames at 64x64 make 80 latent tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                 out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64).eval()


def wan_inputs(batch: int = 2, seed: int = 0, timestep: int = 500) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, 5, 8, 8, generator=generator),
            "timestep": torch.full((batch,), timestep), "return_dict": False,
            "encoder_hidden_states": torch.randn(batch, 8, TEXT_DIM, generator=generator)}


def wan_pipeline(transformer=None, seed: int = 0):
    """A `WanPipeline` without text encoder (call it with prompt embeddings): guidance runs two transformer calls a step."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer or wan_transformer(seed),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def wan_call(seed: int = 0, steps: int = 4, **overrides) -> dict:
    """Keyword arguments of one tiny Wan generation (17 frames, 64x64, guidance 4)."""
    generator = torch.Generator().manual_seed(seed)
    call = {"prompt_embeds": torch.randn(1, 8, TEXT_DIM, generator=generator),
            "negative_prompt_embeds": torch.randn(1, 8, TEXT_DIM, generator=generator),
            "height": 64, "width": 64, "num_frames": 17, "num_inference_steps": steps, "guidance_scale": 4.0,
            "generator": torch.Generator().manual_seed(seed + 1), "output_type": "latent"}
    call.update(overrides)
    return call


def dit_pipeline(seed: int = 0):
    """A class-conditional `DiTPipeline` (guidance doubles the batch: one transformer call a step)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                                        sample_size=16, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(block_out_channels=[8], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                        norm_num_groups=4).eval()
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def cogvideox_transformer(seed: int = 0):
    """A 2-layer `CogVideoXTransformer3DModel` with rotary embeddings (its processor takes ``image_rotary_emb``)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=4, text_embed_dim=16, num_layers=2, sample_width=16,
                                       sample_height=16, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=8, use_rotary_positional_embeddings=True).eval()


def cogvideox_inputs(batch: int = 2, seed: int = 0) -> dict:
    """3 latent frames of 16x16 (192 video tokens, after 8 text tokens in the joint attention)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = 3 * 8 * 8
    rotary = (torch.randn(tokens, 16, generator=generator), torch.randn(tokens, 16, generator=generator))
    return {"hidden_states": torch.randn(batch, 3, 4, 16, 16, generator=generator),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=generator),
            "timestep": torch.tensor([10, 20][:batch]), "image_rotary_emb": rotary, "return_dict": False}
