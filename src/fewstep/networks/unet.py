"""A small UNet in the style of EDM's ``SongUNet``/ADM, sized for CPU (8x8 to 64x64 images).

Residual blocks with group norm and an adaptive scale/shift from the conditioning embedding,
average-pool downsampling, nearest-neighbour upsampling, self-attention at chosen resolutions, a
zero-initialised output. The network is raw (``F`` in EDM's notation); preconditioning lives in
:class:`fewstep.denoiser.EDMDenoiser`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.networks.embed import CondEmbedding


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; saved as JSON beside the weights."""

    resolution: int = 8
    in_channels: int = 1
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0
    num_classes: int = 0
    extra_dims: int = 0
    out_channels: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        for k in ("channel_mult", "attn_resolutions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 32) if c >= 8 else 1, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.norm0, self.conv0 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm1, self.conv1 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.dropout = dropout
        self.attn = attn
        if attn:
            self.norm2 = _norm(cout)
            self.qkv = nn.Conv2d(cout, 3 * cout, 1)
            self.proj = nn.Conv2d(cout, cout, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(h) * (1 + scale) + shift)
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = self.skip(x) + h
        if self.attn:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = x + self.proj(a.transpose(1, 2).reshape(B, C, H, W))
        return x


def _keep(k: int, h: Tensor) -> Tensor:
    return h


class UNet(nn.Module):
    """``F(x, c_noise, labels, extra) -> output`` of the same shape as ``x``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, emb = cfg.channels, cfg.channels * 4
        self.embed = CondEmbedding(ch, emb, cfg.num_classes, cfg.extra_dims)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, res, c = [ch], cfg.resolution, ch
        for level, mult in enumerate(cfg.channel_mult):
            if level > 0:
                self.down.append(nn.AvgPool2d(2))
                res //= 2
                skips.append(c)
            for _ in range(cfg.blocks):
                self.down.append(ResBlock(c, ch * mult, emb, cfg.dropout, res in cfg.attn_resolutions))
                c = ch * mult
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb, cfg.dropout, True), ResBlock(c, c, emb, cfg.dropout, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * mult, emb, cfg.dropout, res in cfg.attn_resolutions))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels or cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, extra: Tensor | None = None,
        after_block: Callable[[int, Tensor], Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """``after_block(k, h)``, if given, rewrites the output of the ``k``-th residual block (down,
        middle, up order; :meth:`block_channels` lists their widths) — DSNO's temporal layers."""
        emb = self.embed(c_noise, labels, extra)
        mix = after_block if after_block is not None else _keep
        h = self.conv_in(x)
        hs, k = [h], 0
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h, k = mix(k, layer(h, emb)), k + 1
            else:
                h = layer(h)
            hs.append(h)
        for layer in self.mid:
            h, k = mix(k, layer(h, emb)), k + 1
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h, k = mix(k, layer(torch.cat([h, hs.pop()], 1), emb)), k + 1
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def block_channels(self) -> list[int]:
        """Output channels of the residual blocks in the order ``after_block`` sees them."""
        return [b.conv1.out_channels for b in [*self.down, *self.mid, *self.up] if isinstance(b, ResBlock)]

    def bottleneck(
        self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        """Features after the middle blocks, ``(B, C, r, r)`` — for discriminator heads."""
        emb = self.embed(c_noise, labels, extra)
        h = self.conv_in(x)
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.mid:
            h = layer(h, emb)
        return h
