"""The shipped digits feature classifier: a small CNN trained on ``digits:train``.

FID on 8x8 digits needs a feature space that knows digits; Inception-v3 on upscaled 8x8 images
does not, and its weights cannot be downloaded here. fewstep therefore trains a small CNN on the
training split (the same images the teacher saw), checks it on the held-out ``digits:test`` split,
and ships it in ``fewstep/assets/classifier/`` (``model.safetensors`` + ``config.json``). FID uses
its penultimate layer, as Inception FID uses the pool3 layer (Heusel et al. 2017, arXiv 1706.08500).

Retrain it (about 20 seconds on 2 CPU cores) with::

    python -m fewstep.eval.classifier --out src/fewstep/assets/classifier

The tier-2 MNIST classifier (32x32, the stand-in for Inception and CLIP score on the latent
text-to-image teacher) is trained the same way on ``mnist:train`` and shipped in
``fewstep/assets/mnist-classifier/``::

    python -m fewstep.eval.classifier --data mnist --out src/fewstep/assets/mnist-classifier
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from fewstep.io import atomic_write_json, save_tensors
from fewstep.networks.classifier import FORMAT, ClassifierConfig, DigitsCNN, save_classifier


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


def _targets(x: Tensor, y: Tensor | None, task: str, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs and targets of one batch: the labels, or (``rotation``) each image turned by a random
    multiple of 90 degrees with that multiple as its target (Gidaris et al. 2018, arXiv 1803.07728)."""
    if task == "labels":
        return x, y
    k = torch.randint(0, 4, (x.shape[0],), generator=g)
    return torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k, strict=True)]), k


def train_classifier(cfg: ClassifierConfig | None = None, train=None, test=None) -> tuple[DigitsCNN, dict]:
    """Train on ``train`` (default ``digits:train``); return the model and its record (accuracy on
    the held-out ``test`` split, time)."""
    from fewstep.data import load_dataset

    cfg = cfg or ClassifierConfig()
    if train is None:
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
            labels = train.labels[idx] if train.labels is not None else None
            x, target = _targets(_shift(train.x[idx], cfg.shift, g), labels, cfg.task, g)
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    held = torch.Generator().manual_seed(cfg.seed + 1)  # fixed rotations of the evaluation images
    record = {
        "task": cfg.task,
        "train_accuracy": accuracy(model, *_targets(train.x, train.labels, cfg.task, held)),
        "test_accuracy": accuracy(model, *_targets(test.x, test.labels, cfg.task, held)),
        "train_split": train.name,
        "test_split": test.name,
        "seconds": round(time.time() - t0, 1),
    }
    return model.eval().requires_grad_(False), record


def fit_to_data(spec, progress=print, note: str = "") -> tuple[DigitsCNN, dict]:
    """A classifier trained on ``spec``'s training split and checked on its held-out split: labels
    when it has classes, else rotation prediction; about 120k images seen (at most 40 epochs)."""
    from fewstep.data import load_dataset

    train, test = load_dataset(spec.with_split("train")), load_dataset(spec.with_split("test"))
    channels, resolution = train.sample_shape[0], train.sample_shape[-1]
    labelled = train.labels is not None and train.num_classes > 1
    epochs = max(3, min(40, -(-120_000 // len(train))))
    cfg = ClassifierConfig(
        in_channels=channels, resolution=resolution, pool=4 if resolution >= 16 else 2,
        num_classes=train.num_classes if labelled else 4, task="labels" if labelled else "rotation",
        epochs=epochs, shift=max(1, resolution // 10),
    )  # fmt: skip
    progress(f"training a feature classifier on {train.name} ({len(train)} images, {cfg.task}, {epochs} epochs"
             f"{'; ' + note if note else ''})")  # fmt: skip
    with torch.enable_grad():  # evaluation may run under no_grad
        model, record = train_classifier(cfg, train, test)
    progress(f"feature classifier: held-out accuracy {100 * record['test_accuracy']:.1f}% on {test.name} "
             f"({record['seconds']} s)")  # fmt: skip
    return model, record


def classifier_for(spec, progress=print) -> Path:
    """The feature classifier of an image folder: trained on its training split (labels from its
    class sub-folders, or — without them — rotation prediction), checked on its held-out split,
    and cached under ``$FEWSTEP_CACHE/classifiers/`` by the folder's digest (file names, sizes,
    modification times) and the images' resolution and channels. Returns its folder."""
    from fewstep.eval.reference import cache_dir, data_key

    if spec.kind == "mnist":  # the shipped one (``python -m fewstep.eval.classifier --data mnist`` trains it)
        from fewstep.teachers import builtin_path

        return builtin_path("mnist-classifier")
    key = f"{data_key(spec.path)}-r{spec.resolution}c{spec.channels}{'-convert' if spec.convert else ''}"
    folder = cache_dir() / "classifiers" / key
    if (folder / "config.json").is_file():
        return folder
    model, record = fit_to_data(spec, progress, "cached for later evaluations")
    save_tensors(folder / "model.safetensors", model.state_dict())
    atomic_write_json(folder / "config.json", {"format": FORMAT, "config": asdict(model.cfg), "record": record,
                                               "data": spec.to_dict()})  # fmt: skip
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="(Re)train fewstep's shipped feature classifiers (digits, mnist).")
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    p.add_argument("--data", default="digits", choices=("digits", "mnist"), help="mnist: the tier-2 classifier")
    p.add_argument("--epochs", type=int, default=ClassifierConfig.epochs)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.data == "mnist":
        from fewstep.data import parse_data

        model, record = fit_to_data(parse_data("mnist"))
    else:
        model, record = train_classifier(ClassifierConfig(epochs=args.epochs, seed=args.seed))
    save_classifier(model, args.out, record)
    print(f"test accuracy {record['test_accuracy']:.4f} on {args.data}:test ({record['seconds']} s); wrote {args.out}")


if __name__ == "__main__":
    main()
