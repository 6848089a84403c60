"""The shipped digits feature classifier: a small CNN trained on ``digits:train``.

FID on 8x8 digits needs a feature space that knows digits; Inception-v3 on upscaled 8x8 images
does not, and its weights cannot be downloaded here. fewstep therefore trains a small CNN on the
training split (the same images the teacher saw), checks it on the held-out ``digits:test`` split,
and ships it in ``fewstep/assets/classifier/`` (``model.safetensors`` + ``config.json``). FID uses
its penultimate layer, as Inception FID uses the pool3 layer (Heusel et al. 2017, arXiv 1706.08500).

Retrain it (about 20 seconds on 2 CPU cores) with::

    python -m fewstep.eval.classifier --out src/fewstep/assets/classifier
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
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


class DigitsCNN(nn.Module):
    """``(N, 1, 8, 8)`` in [-1, 1] -> logits ``(N, 10)``; :meth:`features` is the penultimate
    ``feature_dim`` vector (after ReLU, before the last linear layer)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )  # fmt: skip
        self.fc = nn.Linear(2 * c * 4, cfg.feature_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))  # (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))  # (N, num_classes)


def _shift(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """Translate each image by a random integer offset in [-k, k]^2, filling with background (-1)."""
    if k == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (k, k, k, k), value=-1.0)
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: DigitsCNN, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train_classifier(cfg: ClassifierConfig | None = None) -> tuple[DigitsCNN, dict]:
    """Train on ``digits:train``; return the model and its record (test accuracy, time)."""
    from fewstep.data import load_dataset

    cfg = cfg or ClassifierConfig()
    train, test = load_dataset("digits:train"), load_dataset("digits:test")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = DigitsCNN(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(train) + cfg.batch - 1) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    t0 = time.time()
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), cfg.batch):
            idx = perm[i : i + cfg.batch]
            loss = F.cross_entropy(model(_shift(train.x[idx], cfg.shift, g)), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    record = {
        "train_accuracy": accuracy(model, train.x, train.labels),
        "test_accuracy": accuracy(model, test.x, test.labels),
        "train_split": train.name,
        "test_split": test.name,
        "seconds": round(time.time() - t0, 1),
    }
    return model.eval().requires_grad_(False), record


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="(Re)train fewstep's digits feature classifier on digits:train.")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    p.add_argument("--epochs", type=int, default=ClassifierConfig.epochs)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, record = train_classifier(ClassifierConfig(epochs=args.epochs, seed=args.seed))
    save_classifier(model, args.out, record)
    print(f"test accuracy {record['test_accuracy']:.4f} on digits:test ({record['seconds']} s); wrote {args.out}")


if __name__ == "__main__":
    main()
