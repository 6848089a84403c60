"""fewstep: distill pre-trained diffusion models into 1-4 step generators, and measure them."""

__version__ = "0.1.0"
