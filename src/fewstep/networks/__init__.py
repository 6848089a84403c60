"""Networks: a small EDM-style UNet for images and an MLP for low-dimensional data."""

from fewstep.networks.mlp import MLP
from fewstep.networks.unet import UNet

__all__ = ["MLP", "UNet"]
