"""Turn the LoRA that ``bench/peer_lcm_lora_sd.py`` (diffusers' LCM-LoRA script) saved into a fewstep
run, so that ``fewstep eval RUN`` scores the peer's weights with fewstep's LCM sampler.

    .venv/bin/python bench/peer_to_run.py --peer runs/peer --out runs/peer-run   # teacher: the peer's own
    .venv/bin/fewstep eval runs/peer-run --n 2000 --seeds 1 ...

1. reads the peer's LoRA as the script saves it: ``PEER/unet_lora/pytorch_lora_weights.safetensors``
   (keys ``unet.base_model.model.<layer>.lora_{A,B}.weight``) and its rank/alpha from the peft
   ``PEER/adapter_config.json`` (the script's ``unet.save_pretrained``; the diffusers file carries no alpha);
2. creates a one-step ``lcm`` run of the same teacher folder with LoRA adapters of the peer's rank
   (``fewstep distill --teacher FOLDER --method lcm --lora-rank R --set guidance_input=false``: an
   LCM-parameterised student, a copy of the teacher UNet with adapters on every Linear/Conv2d layer).
   Not the ``lora:R:FOLDER`` teacher spec: its adapters (``fewstep.teachers.diffusers.lora.TARGETS``)
   leave out ``downsamplers.0.conv`` and ``upsamplers.0.conv``, which the script adapts;
3. writes the peer's ``A`` and ``(alpha / r) B`` into the student's adapters (fewstep's adapters use
   ``alpha = r``) in the run's checkpoint (student, target and evaluation EMA), zeroes ``B`` of the
   adapters the peer does not have (``conv_in``, ``conv_out``, ``time_embedding``), checks that the base
   weights are the teacher's, and re-saves ``RUN/student`` with the peer's iterations and minutes (from
   ``PEER/peer_metrics.json``) as the run's cost;
4. checks the mapping: the reloaded run student's UNet output (``load_run``, as ``fewstep eval`` loads it)
   against a stock ``StableDiffusionPipeline`` + ``load_lora_weights`` on random inputs (max |diff| <= 1e-4),
   once with the peer's weights and once with random ``B`` (a trained-for-3-steps LoRA is too close to
   zero for the first check to catch a wrong mapping). The script's own file does not load with
   ``load_lora_weights`` (its keys keep peft's ``base_model.model.`` prefix: NoMatchingPeftModuleError,
   diffusers issue #6392, and it has no alpha), so the stock loader is given the same tensors with that
   prefix removed and the adapter config as metadata; peft's ``PeftModel.from_pretrained(unet, PEER)`` (the
   script's ``adapter_model.safetensors``) is checked too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

PEER_FILE = Path("unet_lora") / "pytorch_lora_weights.safetensors"
STUDENT = "inner.model."  # the UNet inside fewstep's LCMStudent
PREFIXES = ("net.student.", "ema.target.", "eval_ema.")  # student, target network, evaluation EMA


def read_peer(peer: Path, alpha: float | None) -> tuple[dict[str, torch.Tensor], int, float, dict]:
    """``({"<layer>.lora_A": A, "<layer>.lora_B": B}, rank, alpha, peer_metrics)`` of a peer output folder."""
    from safetensors.torch import load_file

    path = peer / PEER_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run bench/peer_lcm_lora_sd.py --output_dir {peer} first")
    layers = {}
    for key, value in load_file(str(path)).items():
        name = key.removeprefix("unet.").removeprefix("base_model.model.")
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise SystemExit(f"unexpected key {key} in {path}")
        layers[name.removesuffix(".weight")] = value.float()
    ranks = {v.shape[0] for k, v in layers.items() if k.endswith("lora_A")}
    if len(ranks) != 1:
        raise SystemExit(f"{path} mixes LoRA ranks {sorted(ranks)}")
    rank = ranks.pop()
    config_path = peer / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config["r"] != rank or config.get("rank_pattern") or config.get("alpha_pattern"):
            raise SystemExit(f"{config_path} does not describe a uniform rank-{rank} LoRA")
        if alpha is not None and alpha != config["lora_alpha"]:
            raise SystemExit(f"--alpha {alpha} contradicts lora_alpha {config['lora_alpha']} in {config_path}")
        alpha = float(config["lora_alpha"])
    elif alpha is None:
        raise SystemExit(f"{config_path} is missing; pass the peer's --lora_alpha as --alpha")
    metrics_path = peer / "peer_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return layers, rank, alpha, metrics


def student_lora(layers: dict[str, torch.Tensor], rank: int, alpha: float, student_keys) -> dict[str, torch.Tensor]:
    """The peer's adapters as student state-dict entries (``inner.model.<layer>.lora_A.default.weight``);
    ``B`` takes the peer's scale ``alpha / r`` (fewstep's adapters have ``alpha = r``, scale 1), and the
    student's adapters the peer lacks get ``B = 0`` (no change to the layer)."""
    out = {}
    for name, value in layers.items():
        layer, _, which = name.rpartition(".")
        key = f"{STUDENT}{layer}.{which}.default.weight"
        if key not in student_keys:
            raise SystemExit(f"the fewstep student has no adapter for the peer's layer {layer}")
        out[key] = value * (alpha / rank) if which == "lora_B" else value
    for key, shape in student_keys.items():
        if "lora_B" in key and key not in out:
            out[key] = torch.zeros(shape)
    return out


def make_run(teacher: str, out: Path, rank: int, metrics: dict, overwrite: bool, seed: int) -> None:
    """A one-step fewstep ``lcm`` run with rank-``rank`` adapters (the weights are replaced afterwards);
    its method options mirror the peer's where fewstep has the same option (recorded, not used by sampling)."""
    from fewstep.train.api import distill

    a = metrics.get("args", {})
    options = {"guidance_input": False, "target_decay": 0.0}
    if "w_min" in a:  # the script's CFG is x_c + w (x_c - x_u) with w in [w_min, w_max]: fewstep's w is that + 1
        options["guidance"] = (a["w_min"] + 1.0, a["w_max"] + 1.0)
    if "loss_type" in a:
        options.update(distance={"l2": "l2", "huber": "huber"}[a["loss_type"]], huber_c=a["huber_c"])
    if "learning_rate" in a:
        options.update(lr=a["learning_rate"], weight_decay=a["adam_weight_decay"], grad_clip=a["max_grad_norm"],
                       betas=(a["adam_beta1"], a["adam_beta2"]))  # fmt: skip
    if "num_ddim_timesteps" in a:
        options["skip"] = 1000 // a["num_ddim_timesteps"]
    distill(teacher, "lcm", max_steps=1, out=out, data="mnist", options=options, lora_rank=rank, batch=8,
            seed=seed, overwrite=overwrite)  # fmt: skip


def rewrite_checkpoint(run: Path, lora: dict[str, torch.Tensor], teacher: str) -> None:
    """Put ``lora`` into every copy of the student in the run's newest checkpoint (checksums updated),
    after checking that the student's base weights are the teacher's."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from fewstep.io import atomic_write_json, save_tensors
    from fewstep.runs.checkpoints import latest, sha256

    found = latest(run / "checkpoints")
    path = found.path / "weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    base = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").state_dict()
    for prefix in PREFIXES:
        for key, value in lora.items():
            old = weights[prefix + key]
            if old.shape != value.shape:
                raise SystemExit(f"{key}: the peer's tensor is {tuple(value.shape)}, the student's {tuple(old.shape)}")
            weights[prefix + key] = value.to(old.dtype).clone()
        unmapped = [k for k in weights if k.startswith(prefix) and "lora_" in k and k[len(prefix) :] not in lora]
        if any("lora_B" in k for k in unmapped):
            raise SystemExit(f"student adapters left unmapped: {unmapped[:3]}")
        for key in [k for k in weights if k.startswith(prefix + STUDENT) and "lora_" not in k]:
            name = key[len(prefix + STUDENT) :].replace(".base_layer.", ".")
            if not torch.equal(weights[key], base[name]):
                raise SystemExit(f"the run student's {name} is not the teacher's; the run trained its base weights")
    save_tensors(path, weights, meta)
    state = json.loads((found.path / "state.json").read_text())
    state["files"]["weights.safetensors"] = sha256(path)
    atomic_write_json(found.path / "state.json", state)


def resave_student(run: Path, peer: Path, metrics: dict) -> None:
    """``RUN/student`` (and ``lora.safetensors``) from the rewritten checkpoint, with the peer's cost."""
    from fewstep.io import atomic_write_json
    from fewstep.runs import load_run
    from fewstep.runs.folder import read_run_config
    from fewstep.train.api import finish

    config = read_run_config(run)
    config["peer"] = {"folder": str(peer.resolve()), "file": str(PEER_FILE), "metrics": "peer_metrics.json",
                      "script": "bench/peer_lcm_lora_sd.py"}  # fmt: skip
    atomic_write_json(run / "config.json", config)
    summary = {
        "step": metrics.get("iterations"),
        "minutes": round(metrics["minutes"], 3) if metrics.get("minutes") is not None else None,
        "stopped_by": f"peer:{metrics.get('stopped_by')}",
        "nonfinite": 0,
    }
    finish(load_run(run), run, summary)


def stock_unet(teacher: str, layers: dict[str, torch.Tensor], rank: int, alpha: float):
    """A stock ``StableDiffusionPipeline`` UNet with ``layers`` loaded by ``load_lora_weights`` (the keys
    without peft's ``base_model.model.`` prefix, the adapter config as metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    modules = sorted({k.rpartition(".")[0] for k in layers})
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers={f"{k}.weight": v for k, v in layers.items()}, unet_lora_adapter_metadata=config
        )
        pipe.load_lora_weights(tmp)
    return pipe.unet.eval()


def unet_inputs(unet, n: int = 4, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([999, 519, 259, 19][:n] + [500] * max(0, n - 4))
    ctx = torch.randn(n, 16, c.cross_attention_dim, generator=g)
    return x, t, ctx


@torch.no_grad()
def unet_out(unet, inputs) -> torch.Tensor:
    x, t, ctx = inputs
    return unet(x, t, encoder_hidden_states=ctx).sample


def check(run: Path, teacher: str, peer: Path, layers: dict, rank: int, alpha: float, seed: int) -> dict:
    """Max |UNet output difference| between the run's student (as ``fewstep eval`` loads it) and stock
    diffusers with the peer's LoRA; plus the same with random ``B`` (mapped the same way), the peft
    ``PeftModel`` reference, and the LoRA's own effect (stock with vs without it)."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from fewstep.runs import load_run

    method = load_run(run)
    student = method.student
    unet = student.model.eval()
    stock = stock_unet(teacher, layers, rank, alpha)
    inputs = unet_inputs(stock, seed=seed)
    ref = unet_out(stock, inputs)
    plain = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").eval()
    plain_out = unet_out(plain, inputs)
    result = {"max_diff": (unet_out(unet, inputs) - ref).abs().max().item()}
    result["lora_effect"] = (plain_out - ref).abs().max().item()
    if (peer / "adapter_model.safetensors").is_file():
        peft_unet = PeftModel.from_pretrained(plain, str(peer)).eval()  # injects into plain
        result["max_diff_peft"] = (unet_out(unet, inputs) - unet_out(peft_unet, inputs)).abs().max().item()
    g = torch.Generator().manual_seed(seed + 1)
    noisy = {k: (0.05 * torch.randn(v.shape, generator=g) if k.endswith("lora_B") else v) for k, v in layers.items()}
    keys = {k: v.shape for k, v in student.state_dict().items() if "lora_" in k}
    student.load_state_dict(student_lora(noisy, rank, alpha, keys), strict=False)
    ref_noisy = unet_out(stock_unet(teacher, noisy, rank, alpha), inputs)
    result["max_diff_random_B"] = (unet_out(unet, inputs) - ref_noisy).abs().max().item()
    result["random_B_effect"] = (plain_out - ref_noisy).abs().max().item()
    return result


def raw_load_error(teacher: str, peer: Path) -> str | None:
    """What stock ``load_lora_weights`` says about the script's file as it is (``None``: it loads)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    try:
        pipe.load_lora_weights(str(peer / PEER_FILE.parent))
    except Exception as e:  # reported, not handled
        return f"{type(e).__name__}: {str(e)[:160]}..."
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peer", required=True, help="the peer script's --output_dir")
    p.add_argument("--out", required=True, help="the fewstep run folder to create")
    p.add_argument("--teacher", help="the teacher folder (default: the peer's --pretrained_teacher_model)")
    p.add_argument("--alpha", type=float, help="the peer's --lora_alpha, if PEER/adapter_config.json is missing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=1e-4, help="largest UNet output difference accepted")
    args = p.parse_args(argv)

    peer, out = Path(args.peer), Path(args.out)
    layers, rank, alpha, metrics = read_peer(peer, args.alpha)
    teacher = args.teacher or metrics.get("args", {}).get("pretrained_teacher_model")
    if not teacher:
        raise SystemExit("pass --teacher (PEER/peer_metrics.json does not name it)")
    teacher = str(Path(teacher).expanduser().resolve())
    minutes = metrics.get("minutes", float("nan"))
    print(f"peer LoRA: {len(layers) // 2} layers, rank {rank}, alpha {alpha:g}; "
          f"{metrics.get('iterations')} iterations in {minutes:.2f} min", flush=True)  # fmt: skip

    make_run(teacher, out, rank, metrics, args.overwrite, args.seed)
    from safetensors import safe_open

    from fewstep.runs.checkpoints import latest

    with_adapters = {}
    with safe_open(str(latest(out / "checkpoints").path / "weights.safetensors"), framework="pt") as f:
        for k in f.keys():
            if k.startswith(PREFIXES[0]) and "lora_" in k:
                with_adapters[k[len(PREFIXES[0]) :]] = f.get_slice(k).get_shape()
    lora = student_lora(layers, rank, alpha, with_adapters)
    peer_layers = {k.rpartition(".")[0] for k in layers}
    extra = sorted({k.split(".lora_")[0][len(STUDENT) :] for k in with_adapters} - peer_layers)
    print(f"student adapters without a peer counterpart (B = 0): {extra}")
    rewrite_checkpoint(out, lora, teacher)
    resave_student(out, peer, metrics)

    problem = raw_load_error(teacher, peer)
    print(f"stock load_lora_weights({peer / PEER_FILE.parent}) as saved: {problem or 'loads'}")
    result = check(out, teacher, peer, layers, rank, alpha, args.seed)
    print(
        f"UNet max |diff| run student vs stock diffusers + load_lora_weights: {result['max_diff']:.3g} "
        f"(the LoRA itself changes the output by {result['lora_effect']:.3g}); "
        f"vs peft PeftModel.from_pretrained(unet, peer): {result.get('max_diff_peft', float('nan')):.3g}; "
        f"with random B: {result['max_diff_random_B']:.3g} (random B changes the output by "
        f"{result['random_B_effect']:.3g})"
    )
    worst = max(v for k, v in result.items() if k.startswith("max_diff"))
    if not worst <= args.atol:
        print(f"FAILED: {worst:.3g} > {args.atol:g}")
        return 1
    print(f"ok; score it with: fewstep eval {out} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
