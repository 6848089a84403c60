"""fewstep's own models: an EDM-preconditioned UNet or MLP saved as safetensors + JSON config.

A model folder holds ``model.safetensors`` and ``config.json``::

    {"format": "fewstep-model", "arch": "unet" | "mlp", "net": {...architecture...},
     "denoiser": {"sample_shape": [...], "num_classes": 10, "sigma_min": ..., ...},
     "info": {...free-form: how it was trained...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.denoiser import EDMDenoiser
from fewstep.errors import FewstepError
from fewstep.io import atomic_write_json, load_tensors, read_json, save_tensors
from fewstep.networks.mlp import MLP, MLPConfig
from fewstep.networks.unet import UNet, UNetConfig

FORMAT = "fewstep-model"


def build_model(arch: str, net: dict, denoiser: dict) -> EDMDenoiser:
    """Build an (untrained) EDM denoiser from its JSON description."""
    if arch == "unet":
        network = UNet(UNetConfig.from_dict(net))
    elif arch == "mlp":
        network = MLP(MLPConfig.from_dict(net))
    else:
        raise FewstepError(f"unknown architecture {arch!r}; use 'unet' or 'mlp'")
    d = dict(denoiser)
    d["sample_shape"] = tuple(d["sample_shape"])
    return EDMDenoiser(network, **d)


def model_config(model: EDMDenoiser, info: dict | None = None) -> dict:
    """The JSON description of an :class:`EDMDenoiser` built by :func:`build_model`."""
    arch = "unet" if isinstance(model.net, UNet) else "mlp"
    return {
        "format": FORMAT,
        "arch": arch,
        "net": model.net.config.to_dict(),
        "denoiser": {
            "sample_shape": list(model.sample_shape),
            "num_classes": model.num_classes,
            "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max,
            "sigma_data": model.sigma_data,
        },
        "info": info or {},
    }


def save_model(model: EDMDenoiser, folder: str | Path, info: dict | None = None, state: dict | None = None) -> Path:
    """Write ``model.safetensors`` (``state``, default the model's own) and ``config.json`` into ``folder``."""
    folder = Path(folder)
    save_tensors(folder / "model.safetensors", model.state_dict() if state is None else state)
    atomic_write_json(folder / "config.json", model_config(model, info))
    return folder


def load_model(folder: str | Path) -> EDMDenoiser:
    """Load a model folder written by :func:`save_model`, checking weights against the config."""
    folder = Path(folder)
    cfg: dict[str, Any] = read_json(folder / "config.json")
    if cfg.get("format") != FORMAT:
        raise FewstepError(f"{folder}/config.json is not a fewstep model config (format={cfg.get('format')!r})")
    model = build_model(cfg["arch"], cfg["net"], cfg["denoiser"])
    state = load_tensors(folder / "model.safetensors")
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if bad or extra:
        what = (bad or extra)[0]
        raise FewstepError(
            f"{folder}: weights do not match config.json (first mismatch: {what}); "
            "the config and the weights come from different models — re-save them together"
        )
    model.load_state_dict(state)
    model.info = cfg.get("info", {})
    return model.eval().requires_grad_(False)
