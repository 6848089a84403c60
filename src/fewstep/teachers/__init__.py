"""Teachers: fewstep's own networks, analytic mixtures, and (later) diffusers models.

``load_teacher(spec)`` accepts
- ``builtin:digits`` / ``builtin:moons`` — the pre-trained models shipped inside the package;
  ``builtin:mnist-sd`` — the shipped latent text-to-image MNIST pipeline (a diffusers folder);
- ``analytic:gaussians8`` / ``analytic:image`` — exact Gaussian-mixture teachers;
- a folder written by :func:`fewstep.teachers.native.save_model` (a teacher or a run's student),
  or a run folder (its student: what ``fewstep teacher train`` makes);
- a diffusers pipeline or model folder (:mod:`fewstep.teachers.diffusers`);
- ``lora:<rank>:<folder>`` — that diffusers teacher carrying LoRA adapters for a LoRA student.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.teachers.analytic import MIXTURE_FORMAT, GaussianMixture, image_mixture, ring2d
from fewstep.teachers.native import load_model, save_model

BUILTINS = ("digits", "moons", "mnist-sd", "mnist-classifier")
ANALYTIC = {"gaussians8": ring2d, "image": image_mixture}


def builtin_path(name: str) -> Path:
    """Folder of a shipped model inside the installed package."""
    if name not in BUILTINS:
        raise FewstepError(f"unknown builtin model {name!r}; use one of {', '.join('builtin:' + b for b in BUILTINS)}")
    path = Path(str(resources.files("fewstep") / "assets" / name))
    if not ((path / "model.safetensors").is_file() or (path / "model_index.json").is_file()):
        raise FewstepError(f"builtin:{name} is missing from this installation ({path}); reinstall fewstep")
    return path


def load_teacher(spec: str | Path | Denoiser) -> Denoiser:
    """Resolve a teacher spec (see module docstring) into a frozen sigma-space denoiser."""
    if isinstance(spec, Denoiser):
        return spec
    spec = str(spec)
    if spec.startswith("builtin:"):
        path = builtin_path(spec.split(":", 1)[1])
        if (path / "model_index.json").is_file():
            from fewstep.teachers.diffusers.loading import load_diffusers

            return load_diffusers(path)
        return load_model(path)
    if spec.startswith("lora:"):
        from fewstep.teachers.diffusers.lora import load_lora_teacher

        return load_lora_teacher(spec)
    if spec.startswith("analytic:"):
        name = spec.split(":", 1)[1]
        if name not in ANALYTIC:
            raise FewstepError(
                f"unknown analytic teacher {name!r}; use one of {', '.join('analytic:' + a for a in ANALYTIC)}"
            )
        return ANALYTIC[name]().eval()
    path = Path(spec)
    if path.is_file():
        from fewstep.io import refuse_pickle

        refuse_pickle(path)
        raise FewstepError(f"{path} is a file; pass the model folder that holds config.json and model.safetensors")
    if not path.is_dir():
        raise FewstepError(f"teacher {spec!r} is neither a builtin:/analytic: name nor an existing folder")
    from fewstep.teachers.diffusers.loading import is_diffusers_folder, load_diffusers

    if is_diffusers_folder(path):
        return load_diffusers(path)
    if (path / "config.json").is_file():
        from fewstep.io import read_json

        fmt = read_json(path / "config.json").get("format")
        if fmt == MIXTURE_FORMAT:
            return GaussianMixture.load(path)
        if fmt == "fewstep-run":  # a run: its student
            if not (path / "student" / "config.json").is_file():
                raise FewstepError(
                    f"run {path} has no finished student yet; finish it with --resume (its checkpoints are kept)"
                )
            path = path / "student"
        return load_model(path)
    raise FewstepError(
        f"{path} has no config.json or model_index.json; pass a fewstep or diffusers model folder (or a builtin: name)"
    )


__all__ = ["GaussianMixture", "load_teacher", "load_model", "save_model", "builtin_path"]
