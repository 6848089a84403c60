"""Seeded generation, teacher fidelity, speed, feature extractors and the reference cache."""

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.eval.features import ClassifierFeatures, RawFeatures, get_extractor
from fewstep.eval.sampling import fidelity, generate, reference_answers, rmse, shard, teacher_sampler
from fewstep.eval.speed import measure_speed
from fewstep.teachers.analytic import GaussianMixture, image_mixture, ring2d


def test_generation_is_batch_size_and_process_count_invariant():
    teacher = ring2d()
    sampler = teacher_sampler(teacher, "dpmpp_2m", 4)
    seeds = list(range(10, 47))
    full, labels = generate(sampler, seeds, (2,), teacher.num_classes, batch=37)
    for batch in (1, 5, 16):
        x, y = generate(sampler, seeds, (2,), teacher.num_classes, batch=batch)
        torch.testing.assert_close(x, full, rtol=0, atol=1e-6)
        assert torch.equal(y, labels)
    # three "processes" each take a strided shard; put back in seed order they give the same samples
    parts = {r: generate(sampler, shard(seeds, r, 3), (2,), teacher.num_classes, batch=4)[0] for r in range(3)}
    merged = torch.empty_like(full)
    for r, x in parts.items():
        merged[r::3] = x
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-6)
    # sample i depends on seed i only: a different seed gives a different sample
    other, _ = generate(sampler, [s + 1000 for s in seeds], (2,), teacher.num_classes)
    assert not torch.allclose(other, full)


def test_labels_are_uniform_and_seeded():
    _, y = generate(lambda z, y: z, range(5000), (2,), num_classes=8, batch=1000)
    counts = torch.bincount(y, minlength=8).double() / 5000
    assert counts.min() > 0.1 and counts.max() < 0.15
    _, y2 = generate(lambda z, y: z, range(5000), (2,), num_classes=8, batch=7)
    assert torch.equal(y, y2)


def test_teacher_sampler_nfe_is_the_solvers_count():
    teacher = ring2d()
    assert [teacher_sampler(teacher, "heun", n).nfe for n in (1, 2, 4, 8, 35)] == [1, 1, 3, 7, 35]
    assert [teacher_sampler(teacher, "euler", n).nfe for n in (1, 2, 4)] == [1, 2, 4]


def test_fidelity_is_zero_for_the_reference_and_shrinks_with_nfe():
    # One Gaussian: the ODE has a closed-form flow, so the reference answer is checked against it, and
    # fidelity must fall as the solver takes more steps.
    gm = GaussianMixture(torch.full((1, 2), 0.3, dtype=torch.float64), 0.4, sigma_max=20.0)
    seeds = range(64)
    ref = reference_answers(gm, seeds)
    z, _ = generate(lambda z, y: z, seeds, (2,))
    exact = gm.exact_flow(z.double() * gm.sigma_max, gm.sigma_max, 0.0)
    assert rmse(ref, exact) < 5e-4  # 128 Heun steps: discretisation error ~2e-4 on samples of scale 0.4
    errs = [fidelity(teacher_sampler(gm, "euler", n), ref, seeds, gm) for n in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_speed_measures_a_sampler():
    teacher = ring2d()
    sp = measure_speed(teacher_sampler(teacher, "euler", 2), (2,), teacher.num_classes, batch=64, repeats=3)
    assert sp.nfe == 2 and sp.batch == 64 and sp.latency_s > 0
    assert sp.samples_per_s == pytest.approx(64 / sp.latency_s)
    assert sp.peak_mem_mb is None or sp.peak_mem_mb >= 0


def test_extractors_check_shapes_with_one_line_errors():
    raw = RawFeatures(2)
    assert raw.features(torch.zeros(3, 2)).shape == (3, 2)
    with pytest.raises(FewstepError, match="takes samples of shape 2"):
        raw.features(torch.zeros(3, 1, 8, 8))
    clf = ClassifierFeatures()
    f = clf.features(image_mixture(k=2).sample(5))
    assert f.shape == (5, clf.dim) and f.dtype == torch.float64
    with pytest.raises(FewstepError, match="1x8x8"):
        clf.features(torch.zeros(2, 3, 8, 8))
    with pytest.raises(FewstepError, match="raw features are for vector data"):
        get_extractor("raw", (1, 8, 8))
    assert isinstance(get_extractor("auto", (2,)), RawFeatures)
    assert isinstance(get_extractor("auto", (1, 8, 8)), ClassifierFeatures)


def test_inception_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FewstepError, match="Inception") as e:
        get_extractor("inception", (3, 32, 32))
    assert "\n" not in str(e.value)
    with pytest.raises(FewstepError, match="do not exist|torch-fidelity"):
        get_extractor("inception", (3, 32, 32), weights=tmp_path / "missing.pth")


def test_shipped_classifier_recognises_held_out_digits():
    from fewstep.data import load_dataset

    clf = ClassifierFeatures()
    test = load_dataset("digits:test")
    acc = float((clf.predict(test.x) == test.labels).double().mean())
    assert acc > 0.97
    assert clf.record["test_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_reference_features_are_cached_as_files(tmp_path, monkeypatch):
    from fewstep.eval.reference import reference_features

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    f1 = reference_features(RawFeatures(2), "moons:600")
    files = list((tmp_path / "reference").glob("*.safetensors"))
    assert len(files) == 1
    f2 = reference_features(RawFeatures(2), "moons:600")
    assert torch.equal(f1, f2) and f1.shape == (600, 2)
