"""Tiny diffusers models built from configs (no downloads), shared by the diffusers/export tests."""

from __future__ import annotations

import torch


def unet2d(num_class_embeds: int | None = None, in_channels: int = 1, seed: int = 0, **kw):
    """An 8x8 UNet2DModel with one attention level; every weight drawn at random (no zero init)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )
    cfg.update(kw)
    return _randomize(UNet2DModel(**cfg).eval(), seed)


def unet2d_condition(sdxl: bool = False, seed: int = 0, **kw):
    """An 8x8 latent UNet2DConditionModel (4 channels, cross-attention dim 12); SDXL's added
    text_time conditions (pooled 6 + 6 time ids) when ``sdxl``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=12,
        attention_head_dim=4,
    )
    if sdxl:
        cfg.update(
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 + 24
        )
    cfg.update(kw)
    return _randomize(UNet2DConditionModel(**cfg).eval(), seed)


def sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=6,
        out_channels=4,
    )
    return _randomize(m.eval(), seed)


def vae(seed: int = 0, shift_factor: float | None = None):
    """A 16x16 RGB -> 4x8x8 AutoencoderKL."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        shift_factor=shift_factor,
    ).eval()


def _randomize(model, seed: int):
    """Diffusers zero-initialises some output layers; give every weight a small random value so
    tests see the whole network."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def text_cond(n: int, sdxl: bool = False, seed: int = 0, pooled: int | None = None):
    from fewstep.teachers.diffusers import TextConditioning

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 5, 12, generator=g)
    if sdxl:
        return TextConditioning(h, torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g))
    if pooled:
        return TextConditioning(h, torch.randn(n, pooled, generator=g))
    return TextConditioning(h)
