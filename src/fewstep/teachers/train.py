"""Networks for a teacher trained from scratch: size presets that fit the data, and the fresh model.

The training itself is :func:`fewstep.train.teacher.train_teacher` (the engine running the EDM
loss of the ``denoise`` method on a freshly initialised network).

Presets follow the data's shape, so a user who gives only ``--data`` gets a network that trains
in minutes on a laptop CPU (seconds per step measured on 2 cores, docs/teachers.md):

| samples            | network                                                         | batch |
|--------------------|-----------------------------------------------------------------|-------|
| vectors (2-D toys) | MLP, hidden 128, depth 3                                        | 512   |
| images <= 16 px    | UNet 32 channels, mult (1, 2), 1 block, no attention (builtin:digits) | 256 |
| images <= 32 px    | UNet 32 channels, mult (1, 2, 2), 1 block, no attention (1.0 M params at 28x28 grey) | 128 |
| larger images      | UNet 64 channels, mult (1, 2, 2, 2), 2 blocks, attention at 16 px | 64  |

All UNet presets use dropout 0.1 (EDM's CIFAR-10 setting; the shipped digits teacher's).
"""

from __future__ import annotations

from fewstep.denoiser import EDMDenoiser
from fewstep.teachers.native import build_model


def preset(sample_shape: tuple[int, ...]) -> tuple[str, dict, int]:
    """``(arch, network options, batch)`` for samples of ``sample_shape``."""
    if len(sample_shape) == 1:
        return "mlp", {"hidden": 128, "depth": 3}, 512
    res = sample_shape[-1]
    if res <= 16:
        return (
            "unet",
            {"channels": 32, "channel_mult": [1, 2], "blocks": 1, "attn_resolutions": [], "dropout": 0.1},
            256,
        )
    if res <= 32:
        net = {"channels": 32, "channel_mult": [1, 2, 2], "blocks": 1, "attn_resolutions": [], "dropout": 0.1}
        return "unet", net, 128
    net = {"channels": 64, "channel_mult": [1, 2, 2, 2], "blocks": 2, "attn_resolutions": [16], "dropout": 0.1}
    return "unet", net, 64


def new_model(
    sample_shape: tuple[int, ...], num_classes: int, arch: str | None = None, net: dict | None = None,
    sigma_data: float = 0.5,
) -> EDMDenoiser:  # fmt: skip
    """A freshly initialised EDM denoiser for the data: the preset's network, updated by ``net``
    (a given ``arch`` other than the preset's starts from ``net`` alone)."""
    p_arch, p_net, _ = preset(tuple(sample_shape))
    arch = arch or p_arch
    options = {**(p_net if arch == p_arch else {}), **(net or {})}
    if arch == "unet":
        options.setdefault("resolution", sample_shape[-1])
        options.setdefault("in_channels", sample_shape[0])
    else:
        options.setdefault("dim", sample_shape[0])
    options["num_classes"] = num_classes
    return build_model(
        arch, options, {"sample_shape": list(sample_shape), "num_classes": num_classes, "sigma_data": sigma_data}
    )
