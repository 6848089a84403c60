"""fewstep: distill pre-trained diffusion models into 1-4 step generators, and measure them."""

from fewstep.version import __version__

_LAZY = {
    "distill": "fewstep.train",
    "load_run": "fewstep.runs",
    "train_teacher": "fewstep.train.teacher",
    "TeacherOptions": "fewstep.train.teacher",
    "load_dataset": "fewstep.data",
    "Dataset": "fewstep.data",
}


def __getattr__(name: str):
    """``fewstep.distill``, ``fewstep.train_teacher``, ... without importing torch on ``import fewstep``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


__all__ = ["__version__", "distill", "load_run", "train_teacher", "TeacherOptions", "load_dataset", "Dataset"]
