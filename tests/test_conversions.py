import torch

from fewstep import conversions as C


def test_vp_roundtrip_float64():
    abar = C.cosine_alphas_cumprod(1000)
    sig = C.vp_sigmas(abar)
    t = torch.tensor([0.0, 3.0, 10.5, 499.25, 998.9], dtype=torch.float64)
    s = C.timestep_to_sigma(t, abar)
    assert torch.allclose(C.sigma_to_timestep(s, abar), t, atol=1e-9)
    # discrete timesteps map exactly onto their sigmas
    ts = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.allclose(C.timestep_to_sigma(ts, abar), sig[ts.long()], rtol=1e-12)


def test_vp_sample_roundtrip():
    abar = C.linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    a = abar[[10, 200, 500, 999]]
    x_t = a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * eps
    x, sigma = C.vp_to_sigma_x(x_t, a)
    assert torch.allclose(x, x0 + sigma[:, None] * eps, atol=1e-12)
    assert torch.allclose(C.sigma_to_vp_x(x, sigma), x_t, atol=1e-12)


def test_flow_and_trig_roundtrips():
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    assert torch.allclose(C.sigma_to_flow_t(C.flow_t_to_sigma(t)), t, atol=1e-14)
    x0, eps = torch.randn(17, 2, dtype=torch.float64), torch.randn(17, 2, dtype=torch.float64)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    x, s = C.flow_to_sigma_x(x_t, t)
    assert torch.allclose(x, x0 + s[:, None] * eps, atol=1e-12)
    assert torch.allclose(C.sigma_to_flow_x(x, s), x_t, atol=1e-12)
    tt = torch.linspace(0.01, 1.5, 17, dtype=torch.float64)
    assert torch.allclose(C.sigma_to_trig_t(C.trig_t_to_sigma(tt, 0.5), 0.5), tt, atol=1e-14)
    x_t = torch.cos(tt)[:, None] * x0 + torch.sin(tt)[:, None] * eps
    x, s = C.trig_to_sigma_x(x_t, tt)
    assert torch.allclose(x, x0 + s[:, None] * eps, atol=1e-10)
    assert torch.allclose(C.sigma_to_trig_x(x, s), x_t, atol=1e-12)


def test_outputs_to_x0_all_predictions():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, generator=g, dtype=torch.float64)
    abar = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = a[:, None] * x0 + s[:, None] * eps
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": a[:, None] * eps - s[:, None] * x0}
    for pred, out in outputs.items():
        assert torch.allclose(C.x0_from_output(out, x_t, a, s, pred), x0, atol=1e-12), pred
        assert torch.allclose(C.output_from_x0(x0, x_t, a, s, pred), out, atol=1e-10), pred
    t = torch.rand(5, generator=g, dtype=torch.float64)
    x_f = (1 - t)[:, None] * x0 + t[:, None] * eps
    assert torch.allclose(C.x0_from_output(eps - x0, x_f, 1 - t, t, "flow"), x0, atol=1e-12)


def test_vp_model_equals_its_sigma_space_view(mixture64):
    """An eps-prediction VP model built from the exact denoiser gives the same x0 in both views."""
    abar = C.cosine_alphas_cumprod(1000)
    x0 = mixture64.sample(6, torch.Generator().manual_seed(2))
    eps = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ts = torch.tensor([5, 100, 300, 600, 900, 999])
    a, s = abar[ts].sqrt(), (1 - abar[ts]).sqrt()
    x_t = a[:, None] * x0 + s[:, None] * eps

    def vp_eps_model(x_t, t):  # a VP teacher: eps-prediction from the exact posterior mean
        sigma = C.timestep_to_sigma(t.double(), abar)
        x = x_t / C.vp_scale(sigma)[:, None]
        x0_hat = mixture64(x, sigma)
        return C.output_from_x0(x0_hat, x_t, C.vp_scale(sigma), sigma * C.vp_scale(sigma), "epsilon")

    x0_vp = C.x0_from_output(vp_eps_model(x_t, ts), x_t, a, s, "epsilon")
    x, sigma = C.vp_to_sigma_x(x_t, abar[ts])
    assert torch.allclose(x0_vp, mixture64(x, sigma), atol=1e-10)
