"""Student parameterisations (DESIGN.md §3). Each wraps an :class:`EDMDenoiser` initialised from
the teacher, so a student starts as a copy of the teacher's network.

- :class:`ConsistencyStudent` — x0 predictor with the consistency boundary condition
  ``f(x, sigma_min) = x`` (Song et al. 2023, arXiv 2303.01469, Eq. 8 / Appendix C).
- :class:`FlowMapStudent` — ``G(x, t, s)`` jumping from noise level ``t`` to ``s <= t``, CTM's
  parameterisation ``G = (s/t) x + (1 - s/t) g(x, t, s)`` (Kim et al. 2023, arXiv 2310.02279, Eq. 5);
  ``s`` enters the network as an extra scalar condition.
- :class:`OneStepGenerator` — ``G(z) = D(sigma_init z, sigma_init)``, the generator of KD, DMD,
  SiD and Diff-Instruct (SiD feeds ``sigma_init = 2.5``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, EDMDenoiser, append_dims, as_sigma, copy_contract
from fewstep.errors import FewstepError


def copy_teacher(teacher: Denoiser, extra_dims: int = 0) -> EDMDenoiser:
    """A trainable copy of an EDM-preconditioned teacher, optionally with ``extra_dims`` new scalar
    inputs whose embeddings start at zero, so the copy initially equals the teacher.

    A teacher that defines ``trainable_copy(extra_dims)`` (a diffusers teacher) makes its own copy.
    """
    if hasattr(teacher, "trainable_copy"):
        return teacher.trainable_copy(extra_dims)
    if not isinstance(teacher, EDMDenoiser):
        raise FewstepError(
            f"cannot initialise a student from a {type(teacher).__name__}; students copy an EDM-preconditioned "
            "fewstep network (native or wrapped) — build the student network yourself for other teachers"
        )
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if extra_dims:
        from fewstep.networks.embed import CondEmbedding

        old = student.net.embed
        base = old.pos.dim
        emb = old.noise_mlp[-1].out_features
        ref = next(old.parameters())  # the new embedding lives on the teacher's device and dtype
        new = CondEmbedding(base, emb, old.num_classes, old.extra_dims + extra_dims).to(ref.device, ref.dtype)
        new.load_state_dict(old.state_dict(), strict=False)
        for mlp in list(new.extra_mlps)[old.extra_dims :]:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        student.net.embed = new
        student.net.config.extra_dims = new.extra_dims
    return student


def set_dropout(module: nn.Module, p: float | None) -> None:
    """Set the dropout rate of every layer inside a student or fake score (``None`` keeps what the
    teacher copy has): ``nn.Dropout`` layers (diffusers networks), fewstep blocks with a float
    ``dropout`` attribute, and fewstep network configs (so a saved student records it)."""
    if p is None:
        return
    if not 0.0 <= p < 1.0:
        raise FewstepError(f"dropout must lie in [0, 1), got {p}")
    import dataclasses

    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(vars(m).get("dropout"), float):  # an instance attribute (not a diffusers config's)
            m.dropout = p
        config = getattr(m, "config", None)
        if dataclasses.is_dataclass(config) and isinstance(getattr(config, "dropout", None), float):
            config.dropout = p


def consistency_student(teacher: Denoiser, extra_dims: int = 0) -> nn.Module:
    """The consistency student of ``teacher``: :class:`ConsistencyStudent` over a teacher copy, or
    the teacher's own ``consistency_student(extra_dims)`` (a diffusers teacher's LCM student,
    which stock diffusers schedulers can sample)."""
    if hasattr(teacher, "consistency_student"):
        return teacher.consistency_student(extra_dims)
    return ConsistencyStudent(copy_teacher(teacher, extra_dims))


class ConsistencyStudent(nn.Module):
    """``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise)`` with the consistency
    scalings ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``,
    ``c_out = sd (sigma - sigma_min) / sqrt(sigma^2 + sd^2)``, so ``f(x, sigma_min) = x`` exactly.
    ``extra`` (e.g. LCM's guidance scale) is passed through to the network."""

    def __init__(self, net: EDMDenoiser) -> None:
        super().__init__()
        self.net = net
        copy_contract(self, net)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, extra: Tensor | None = None) -> Tensor:
        sigma = as_sigma(sigma, x)
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = sd * (sigma - smin) / (sigma**2 + sd**2).sqrt()
        F_x = self.net.raw(x, sigma, cond, extra)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F_x


class FlowMapStudent(nn.Module):
    """CTM's ``G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)`` with ``g`` an EDM denoiser that
    receives ``c_noise(s) = ln(s)/4`` as an extra input (``s = 0`` is clamped to ``sigma_min``
    for the embedding only). ``G(x, t, t) = x`` and ``G(x, t, 0) = g(x, t, 0)``."""

    def __init__(self, net: EDMDenoiser) -> None:
        super().__init__()
        self.net = net
        copy_contract(self, net)

    def g(self, x: Tensor, t: Tensor, s: Tensor, cond: Any = None, **net_kw: Any) -> Tensor:
        t, s = as_sigma(t, x), as_sigma(s, x)
        s_emb = s.clamp_min(self.sigma_min).log() / 4
        return self.net(x, t, cond, extra=s_emb[:, None], **net_kw)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Any = None, **net_kw: Any) -> Tensor:
        """``net_kw`` goes to the network (a UNet's ``after_block``)."""
        t, s = as_sigma(t, x), as_sigma(s, x)
        ratio = append_dims(s / t, x.ndim)
        return ratio * x + (1 - ratio) * self.g(x, t, s, cond, **net_kw)


class OneStepGenerator(nn.Module):
    """``G(z, c) = D(sigma_init z, sigma_init, c)``: a one-step generator initialised from the
    teacher's denoiser at noise level ``sigma_init``."""

    def __init__(self, net: EDMDenoiser, sigma_init: float) -> None:
        super().__init__()
        self.net = net
        self.sigma_init = float(sigma_init)
        copy_contract(self, net)

    def forward(self, z: Tensor, cond: Any = None) -> Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device, dtype=z.dtype)
        return self.net(self.sigma_init * z, sigma, cond)


# --- a student's parameterisation, as data (a chain records it so that reloading rebuilds it) ---
def layout(student: nn.Module) -> list[str] | None:
    """A student's parameterisation, outermost first (``["generator:80", "consistency"]``), or
    ``None`` for a network fewstep cannot rebuild from the teacher."""
    if isinstance(student, OneStepGenerator):
        inner = layout(student.net)
        return None if inner is None else [f"generator:{student.sigma_init!r}", *inner]
    if isinstance(student, ConsistencyStudent) and _plain(student.net):
        return ["consistency"]
    if isinstance(student, FlowMapStudent):
        return ["flowmap"]
    if _plain(student):
        return ["denoiser"]
    return None


def _plain(net: nn.Module) -> bool:
    """A teacher-shaped EDM denoiser without extra scalar inputs."""
    config = getattr(getattr(net, "net", None), "config", None)
    return type(net) is EDMDenoiser and not getattr(config, "extra_dims", 0)


def build_layout(spec: list[str], teacher: Denoiser) -> nn.Module:
    """A student of parameterisation ``spec`` around fresh teacher copies (weights come later)."""
    head, rest = spec[0], spec[1:]
    if head.startswith("generator:"):
        return OneStepGenerator(build_layout(rest, teacher), float(head.split(":", 1)[1]))
    if head == "consistency":
        return ConsistencyStudent(copy_teacher(teacher))
    if head == "flowmap":
        return FlowMapStudent(copy_teacher(teacher, extra_dims=1))
    if head == "denoiser":
        return copy_teacher(teacher)
    raise FewstepError(f"unknown student layout {spec!r} in the run's config.json")


# --- students that are not teacher copies (compression, analytic teachers) ---------------------------
PRESETS = {"half": 0.5, "quarter": 0.25}  # fraction of the teacher's parameters


def copyable(teacher: Denoiser) -> bool:
    """Whether students can start as a copy of ``teacher`` (a fewstep network or a diffusers teacher)."""
    return isinstance(teacher, EDMDenoiser) or hasattr(teacher, "trainable_copy")


def student_network(teacher: Denoiser, spec: str | dict | nn.Module | None = None) -> EDMDenoiser:
    """A freshly initialised EDM denoiser for a student that is not a teacher copy.

    ``spec`` may also be a network object: an :class:`EDMDenoiser` (copied) or any module
    ``F(x, c_noise, labels, extra)`` (copied and wrapped in EDM's preconditioning with the teacher's
    noise range).

    ``spec``: ``"half"``/``"quarter"`` (the teacher's architecture with the channel width, or an
    MLP's hidden width, whose parameter count is nearest that fraction of the teacher's), a dict of
    network options (``{"channels": 16}``, ``{"arch": "mlp", "hidden": 128}``) laid over the
    teacher's configuration (or over the default below), or ``None``: the default for a teacher
    that has no network to copy (an analytic mixture) — an MLP (hidden 256, depth 4) for flat
    samples, a UNet for images (the digits teacher's shape: 32 channels, two levels of one block
    each, no attention; about 0.66 M parameters at 8x8). The denoiser's noise range, ``sigma_data``, sample
    shape and classes are the teacher's."""
    from fewstep.teachers.native import build_model

    if isinstance(spec, EDMDenoiser):
        return copy.deepcopy(spec).train().requires_grad_(True)
    base = _net_description(teacher)
    if isinstance(spec, nn.Module):
        d = base["denoiser"]
        return EDMDenoiser(copy.deepcopy(spec), **{**d, "sample_shape": tuple(d["sample_shape"])}).train()
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise FewstepError(
                f"unknown student network {spec!r}; use a preset ({', '.join(PRESETS)}) or a JSON object of "
                "network options such as '{\"channels\": 16}'"
            )
        if not isinstance(teacher, EDMDenoiser):
            raise FewstepError(f"--student-net {spec}: presets scale the teacher's network; this teacher has none")
        return _preset(teacher, base, PRESETS[spec])
    net = dict(base["net"])
    arch = base["arch"]
    if spec:
        spec = dict(spec)
        arch = spec.pop("arch", arch)
        if arch != base["arch"]:
            net = _default_net(teacher, arch)
        unknown = sorted(set(spec) - set(net))
        if unknown:
            raise FewstepError(
                f"--student-net: unknown {arch} option {unknown[0]!r}; options: {', '.join(sorted(net))}"
            )
        net.update(spec)
    net["extra_dims"] = 0
    return build_model(arch, net, base["denoiser"]).train()


def _net_description(teacher: Denoiser) -> dict:
    """The teacher's network description (``arch``, ``net``, ``denoiser``), or a default one."""
    from fewstep.teachers.native import model_config

    if isinstance(teacher, EDMDenoiser) and hasattr(getattr(teacher, "net", None), "config"):
        return model_config(teacher)
    shape = tuple(teacher.sample_shape)
    arch = "mlp" if len(shape) == 1 else "unet"
    return {
        "arch": arch,
        "net": _default_net(teacher, arch),
        "denoiser": {
            "sample_shape": list(shape),
            "num_classes": int(teacher.num_classes),
            "sigma_min": float(teacher.sigma_min),
            "sigma_max": float(teacher.sigma_max),
            "sigma_data": float(teacher.sigma_data),
        },
    }


def _default_net(teacher: Denoiser, arch: str) -> dict:
    from fewstep.networks.mlp import MLPConfig
    from fewstep.networks.unet import UNetConfig

    shape, classes = tuple(teacher.sample_shape), int(teacher.num_classes)
    if arch == "mlp":
        if len(shape) != 1:
            raise FewstepError(f"an MLP student needs flat samples; this teacher's are {shape}")
        return MLPConfig(dim=shape[0], num_classes=classes).to_dict()
    if len(shape) != 3 or shape[1] != shape[2]:
        raise FewstepError(f"a UNet student needs square images (C, H, H); this teacher's samples are {shape}")
    return UNetConfig(resolution=shape[1], in_channels=shape[0], channels=32, blocks=1,
                      attn_resolutions=(), num_classes=classes).to_dict()  # fmt: skip


def _preset(teacher: EDMDenoiser, base: dict, fraction: float) -> EDMDenoiser:
    from fewstep.teachers.native import build_model

    width = "channels" if base["arch"] == "unet" else "hidden"
    full = sum(p.numel() for p in teacher.parameters())
    best = None
    for w in range(2, int(base["net"][width]) + 1, 2):
        net = {**base["net"], width: w, "extra_dims": 0}
        model = build_model(base["arch"], net, base["denoiser"])
        gap = abs(sum(p.numel() for p in model.parameters()) / full - fraction)
        if best is None or gap < best[0]:
            best = (gap, model)
    return best[1].train()


def inner_denoiser(student: nn.Module) -> EDMDenoiser | None:
    """The plain EDM denoiser a student wraps (through ``.net``: generator, consistency, flow map)."""
    inner = student
    while not isinstance(inner, EDMDenoiser) and isinstance(getattr(inner, "net", None), nn.Module):
        inner = inner.net
    return inner if isinstance(inner, EDMDenoiser) else None


def network_record(student: nn.Module) -> dict | None:
    """The description of the plain EDM denoiser inside ``student`` (``arch``, ``net`` with
    ``extra_dims`` 0, ``denoiser``), for ``config.json``; ``None`` for other networks."""
    from fewstep.teachers.native import model_config

    inner = inner_denoiser(student)
    if inner is None:
        return None
    if not hasattr(inner.net, "config") or not hasattr(inner.net.config, "to_dict"):
        return {"object": type(inner.net).__name__}
    cfg = model_config(inner)
    cfg["net"] = {**cfg["net"], "extra_dims": 0}
    return {k: cfg[k] for k in ("arch", "net", "denoiser")}


def build_network(record: dict) -> EDMDenoiser:
    """A fresh network from :func:`network_record`'s description (weights come later)."""
    from fewstep.teachers.native import build_model

    if "object" in record:
        raise FewstepError(
            f"this run's student network is a {record['object']} given as an object; fewstep cannot rebuild it "
            "— pass it again (load_run(path, student=network))"
        )
    return build_model(record["arch"], record["net"], record["denoiser"]).train()


# --- LoRA (peft) -----------------------------------------------------------------------------------
def tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] | None = None) -> Any:
    """Add peft LoRA adapters (Hu et al. 2021, arXiv 2106.09685; ``lora_alpha = alpha or rank``) to
    the ``targets`` layers of ``model`` (names or name suffixes; default: every ``nn.Linear`` and
    ``nn.Conv2d`` of a fewstep network outside its conditioning embedding — the convolutions,
    attention projections and per-block embedding projections, as LCM-LoRA adapts in SD's UNet) and
    freeze everything else. ``B`` starts at zero, so the model is unchanged. Returns the ``LoraConfig``."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise FewstepError("LoRA students need peft: pip install 'fewstep[diffusers]'") from None

    if rank < 1:
        raise FewstepError(f"LoRA rank must be >= 1, got {rank}")
    names = [n for n, _ in model.named_modules()]
    if targets is None:
        present = sorted(
            n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and ".embed." not in f".{n}"
        )
    else:
        present = sorted({t for t in targets if any(n == t or n.endswith("." + t) for n in names)})
    if not present:
        raise FewstepError(f"no LoRA target layers in {type(model).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=present)
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin (UNet2DConditionModel, transformers)
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def lora_rank(student: nn.Module) -> int | None:
    """The rank of the LoRA adapters inside ``student`` (``None``: none)."""
    for m in student.modules():
        r = getattr(m, "r", None)
        if isinstance(r, dict) and r:
            return int(next(iter(r.values())))
    return None


def merge_lora(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with its LoRA adapters merged into the weights and removed (peft's
    ``merge``): a full student of the base architecture, the same function."""
    merged = copy.deepcopy(student)
    for name, layer in [(n, m) for n, m in merged.named_modules() if n and _is_tuner(m)]:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    return merged


def _is_tuner(m: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(m, BaseTunerLayer)
