"""Run folders, below both the engine (:mod:`fewstep.train`, which writes them) and evaluation
(:mod:`fewstep.eval`, which reads them): the folder layout and its files (:mod:`.folder`), the
checkpoint format (:mod:`.checkpoints`), and loading a run back as its method (:mod:`.load`)."""

from fewstep.runs.folder import RUN_FORMAT, is_run_dir, read_metrics, read_run_config
from fewstep.runs.load import load_checkpoint_into, load_run, run_data

__all__ = [
    "RUN_FORMAT",
    "is_run_dir",
    "load_checkpoint_into",
    "load_run",
    "read_metrics",
    "read_run_config",
    "run_data",
]
