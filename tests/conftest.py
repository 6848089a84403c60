import os

import pytest
import torch

# Tests are small; one thread keeps them fast and deterministic on a shared 2-core machine.
torch.set_num_threads(int(os.environ.get("FEWSTEP_TEST_THREADS", "1")))


@pytest.fixture
def mixture64():
    """A 2-D, 3-component mixture in float64 with class labels (nonlinear exact denoiser)."""
    from fewstep.teachers.analytic import GaussianMixture

    means = torch.tensor([[1.0, 0.5], [-0.8, 0.3], [0.1, -1.0]], dtype=torch.float64)
    return GaussianMixture(
        means,
        torch.tensor([0.3, 0.2, 0.4], dtype=torch.float64),
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        labels=torch.tensor([0, 1, 1]),
        sigma_max=10.0,
    )
