"""Small teachers, data and methods for the training-engine tests (tests/test_engine_*.py,
tests/test_train_*.py). Everything is tiny so a test step takes milliseconds."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data import Dataset
from fewstep.methods.base import Batch, EMASpec, Method, OptimizerSpec
from fewstep.teachers.native import build_model
from fewstep.train.config import TrainConfig


def tiny_teacher(num_classes: int = 2, hidden: int = 32, seed: int = 0):
    """A randomly initialised 2-D MLP EDM denoiser (its output layer is made non-zero)."""
    torch.manual_seed(seed)
    t = build_model(
        "mlp",
        {"dim": 2, "hidden": hidden, "depth": 1, "num_classes": num_classes},
        {"sample_shape": [2], "num_classes": num_classes},
    )
    with torch.no_grad():
        t.net.out.weight.normal_(0, 0.1)
    return t.eval().requires_grad_(False)


def tiny_data(n: int = 512, num_classes: int = 2, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * 0.5
    labels = torch.randint(num_classes, (n,), generator=g) if num_classes else None
    return Dataset(x, labels, num_classes, "tiny")


def tiny_config(**kw) -> TrainConfig:
    base = dict(max_steps=10, batch=8, log_every=5, checkpoint_every=5, sample_n=0, ema_decay=0.5, cpu=True)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


@dataclass
class PairConfig:
    lr: float = 1e-2
    a_every: int = 1
    b_every: int = 1
    b_offset: int = 0
    kind: str = "adam"
    grad_clip: float | None = None
    ema_decay: float = 0.5
    cross_only: bool = False  # each loss depends on the *other* optimizer's network only (leak test)
    nan_steps: tuple[int, ...] = ()  # iterations whose losses are NaN


class Pair(Method):
    """Two linear networks ``a`` (the student) and ``b`` with their own optimizers, an EMA of ``b``,
    and a frozen linear teacher-side network. Losses depend only on the batch, so the method is
    deterministic given the data. Records what the engine asked for."""

    name = "test-pair"
    needs_data = True
    Config = PairConfig

    def __init__(self, teacher, config: PairConfig | None = None) -> None:
        super().__init__(teacher, config)
        self.student = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self.b_ema = copy.deepcopy(self.b)
        self.frozen_head = nn.Linear(2, 2)
        self.calls: list[tuple[int, frozenset[str]]] = []
        self.b_history: list[Tensor] = []  # b's weight before each iteration that calls losses

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "b": self.b}

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "frozen_head": self.frozen_head}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {
            "a": OptimizerSpec(["student"], c.lr, kind=c.kind, every=c.a_every, grad_clip=c.grad_clip),
            "b": OptimizerSpec(["b"], c.lr, kind=c.kind, every=c.b_every, offset=c.b_offset, grad_clip=c.grad_clip),
        }

    def emas(self) -> dict[str, EMASpec]:
        return {"b_ema": EMASpec("b", self.config.ema_decay)}

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        self.calls.append((step, frozenset(due)))
        self.b_history.append(self.b.weight.detach().clone())
        x = batch.x
        target = self.frozen_head(self.teacher(x, torch.ones(len(x)), batch.labels))
        out = {}
        if self.config.cross_only:  # zero gradient for the own network, non-zero for the other
            if "a" in due:
                out["a"] = 0 * self.student(x).sum() + (self.b(x) - target).pow(2).mean()
            if "b" in due:
                out["b"] = 0 * self.b(x).sum() + (self.student(x) - target).pow(2).mean()
        else:
            if "a" in due:
                out["a"] = (self.student(x) - target).pow(2).mean() + 0.1 * self.b(x).pow(2).mean()
            if "b" in due:
                out["b"] = (self.b(x) - target.flip(1)).pow(2).mean()
        if step in self.config.nan_steps:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond=None) -> Tensor:
        return self.student(noise)


def sigterm_at(method: Method, step: int) -> None:
    """Make ``method`` send SIGTERM to its own process when ``losses`` is called at ``step``."""
    import signal

    inner = method.losses

    def losses(batch, i, due):
        if i == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(batch, i, due)

    method.losses = losses


def state_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
