"""`fewstep distill` on a diffusers teacher, then `fewstep export`: stock diffusers reproduces the run."""

import numpy as np
import pytest
import torch

from diffusers_tiny import unet2d
from fewstep.cli import main
from fewstep.teachers.diffusers.students import lcm_sample

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def test_distill_export_and_sample_in_diffusers(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    diffusers.DDPMPipeline(unet=unet2d(num_class_embeds=11), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        teacher
    )
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["distill", "--teacher", str(teacher), "--method", "cd", "--data", "digits", "--out", str(run),
                 "--max-steps", "2", "--batch", "8", "--set", "sample_n=0"]) == 0  # fmt: skip
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert str(teacher) in card and "cd (arXiv 2303.01469)" in card
    assert main(["sample", "--model", str(run), "-n", "3", "--steps", "1", "--out", str(tmp_path / "s.npz")]) == 0
    saved = np.load(tmp_path / "s.npz")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    labels = saved["labels"].tolist()
    images = pipe(batch_size=3, class_labels=labels, num_inference_steps=1, generator=gens(saved["seeds"]),
                  output_type="pt").images  # fmt: skip
    # `fewstep sample` starts the student at sigma_max * z, the pipeline at z / sqrt(abar_T): the same
    # up to 1 / (2 sigma_max^2) = 2e-5 of the input
    fewstep_images = torch.from_numpy((saved["samples"] / 2 + 0.5).clip(0, 1))
    assert torch.allclose(images, fewstep_images, atol=2e-3), (images - fewstep_images).abs().max()
    # multistep: exactly the LCM sampler fewstep runs for this student
    from fewstep.runs import load_run

    student = load_run(run).student
    images = pipe(batch_size=3, class_labels=labels, num_inference_steps=2, generator=gens([0, 1, 2]),
                  output_type="pt").images  # fmt: skip
    with torch.no_grad():
        ref = (lcm_sample(student, gens([0, 1, 2]), 2, torch.tensor(labels)) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, ref, atol=2e-4)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "teacher"), "--out", str(tmp_path / "x")]) == 2
    assert "not a fewstep run directory" in capsys.readouterr().err
