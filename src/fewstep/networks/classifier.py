"""The feature classifier network fewstep ships (a small CNN; FID on small images uses its
penultimate layer) and its saved format. Training it is :mod:`fewstep.eval.classifier`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.errors import FewstepError
from fewstep.io import atomic_write_json, load_tensors, read_json, save_tensors

FORMAT = "fewstep-classifier"


@dataclass
class ClassifierConfig:
    """Architecture and training recipe of :class:`DigitsCNN` (saved as ``config.json``)."""

    channels: int = 32
    feature_dim: int = 64
    num_classes: int = 10
    epochs: int = 40
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    shift: int = 1  # random translation of up to this many pixels (augmentation)
    dropout: float = 0.2
    seed: int = 0
    in_channels: int = 1
    resolution: int = 8
    pool: int = 2  # spatial size before the feature layer (adaptive average pooling)
    task: str = "labels"  # labels (class sub-folders) or rotation (label-free: which of 4 rotations)


class DigitsCNN(nn.Module):
    """``(N, C, R, R)`` in [-1, 1] -> logits ``(N, num_classes)``; :meth:`features` is the penultimate
    ``feature_dim`` vector (after ReLU, before the last linear layer). The shipped digits network
    is the 8x8 grey case (two poolings reach 2x2, where the adaptive pooling changes nothing)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.conv = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.AdaptiveAvgPool2d(cfg.pool),
        )  # fmt: skip
        self.fc = nn.Linear(2 * c * cfg.pool**2, cfg.feature_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))  # (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))  # (N, num_classes)


def save_classifier(model: DigitsCNN, folder: str | Path, record: dict) -> Path:
    folder = Path(folder)
    save_tensors(folder / "model.safetensors", model.state_dict())
    cmd = "python -m fewstep.eval.classifier --out src/fewstep/assets/classifier"
    atomic_write_json(folder / "config.json", {"format": FORMAT, "config": asdict(model.cfg), "record": record,
                                               "command": cmd})  # fmt: skip
    return folder


def shipped_path() -> Path:
    return Path(str(resources.files("fewstep") / "assets" / "classifier"))


def load_classifier(folder: str | Path | None = None) -> DigitsCNN:
    """Load a classifier folder (the shipped one by default), frozen, in eval mode."""
    folder = Path(folder) if folder is not None else shipped_path()
    if not (folder / "model.safetensors").is_file():
        raise FewstepError(
            f"no digits classifier at {folder}; retrain it with `python -m fewstep.eval.classifier --out {folder}`"
        )
    meta = read_json(folder / "config.json")
    if meta.get("format") != FORMAT:
        raise FewstepError(f"{folder}/config.json is not a fewstep classifier config (format={meta.get('format')!r})")
    model = DigitsCNN(ClassifierConfig(**meta["config"]))
    model.load_state_dict(load_tensors(folder / "model.safetensors"))
    model.record = meta.get("record", {})
    return model.eval().requires_grad_(False)
