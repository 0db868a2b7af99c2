"""Diffusion processes, the denoiser's parameterizations, the DSM loss and the samplers,
checked against closed forms: a Gaussian's exact score and Monte-Carlo of the SDEs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import train
from genjax.models import diffusion
from genjax.sampling import diffusion as samplers

PROCESSES = {
    "ve": diffusion.Process(sde="ve", sigma_min=0.01, sigma_max=10.0),
    "vp": diffusion.Process(sde="vp"),
    "subvp": diffusion.Process(sde="subvp"),
    "edm": diffusion.Process(sde="edm", sigma_max=10.0),
}
# Data N(MU, diag(VAR)): its denoiser is E[x₀ | x̂] = μ + v/(v + σ²)·(x̂ − μ).
MU = jnp.array([1.0, -2.0])
VAR = jnp.array([0.25, 4.0])


def exact_denoiser(x_hat, sigma_B):
    shrink = VAR / (VAR + sigma_B[:, None] ** 2)
    return MU + shrink * (x_hat - MU)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_marginals_match_monte_carlo_of_the_forward_sde(name):
    p = PROCESSES[name]
    lo, hi = p.t_range
    t0, t1, n_steps = lo, lo + 0.5 * (hi - lo), 2000
    x0 = 1.5
    key = jax.random.key(0)
    s0, std0 = p.marginal(jnp.float32(t0))
    x = s0 * x0 + std0 * jax.random.normal(key, (20000,))
    ts = jnp.linspace(t0, t1, n_steps + 1)

    def step(x, inputs):
        t, dt, k = inputs
        f, g2 = p.sde_coefficients(t)
        return x + f * x * dt + jnp.sqrt(g2 * dt) * jax.random.normal(k, x.shape), None

    keys = jax.random.split(jax.random.key(1), n_steps)
    x, _ = jax.lax.scan(step, x, (ts[:-1], jnp.diff(ts), keys))
    mean, std = p.marginal(jnp.float32(t1))
    np.testing.assert_allclose(np.mean(x), mean * x0, atol=0.03 * float(std) + 1e-3)
    np.testing.assert_allclose(np.std(x), std, rtol=0.03)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_time_and_sigma_are_inverse(name):
    p = PROCESSES[name]
    lo, hi = p.t_range
    t = jnp.linspace(max(lo, 1e-3), hi, 7)
    np.testing.assert_allclose(p.t_of_sigma(p.sigma(t)), t, rtol=1e-4)


def _net_from_denoiser(p, denoiser):
    """The network that makes ``denoise`` equal ``denoiser``, in p's parameterization."""

    def net(inp, noise_in):
        if p.parameterization == "edm":
            sigma = jnp.exp(4 * noise_in)
            c_skip, c_out, c_in, _ = diffusion.edm_coefficients(p, sigma)
            x_hat = inp / c_in[:, None]
            return (denoiser(x_hat, sigma) - c_skip[:, None] * x_hat) / c_out[:, None]
        s, std = p.marginal(noise_in)
        x_hat = inp / s[:, None]
        d = denoiser(x_hat, p.sigma(noise_in))
        eps = (inp - s[:, None] * d) / std[:, None]
        return {"eps": eps, "x0": d, "v": s[:, None] * eps - std[:, None] * d}[p.parameterization]

    return net


@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
def test_parameterizations_agree_when_converted(parameterization):
    p = dataclasses.replace(PROCESSES["vp"], parameterization=parameterization)
    net = _net_from_denoiser(p, exact_denoiser)
    x_hat = jax.random.normal(jax.random.key(0), (64, 2)) * 3
    sigma = jnp.geomspace(0.05, 20.0, 64)
    np.testing.assert_allclose(
        diffusion.denoise(p, net, x_hat, sigma), exact_denoiser(x_hat, sigma), rtol=2e-4, atol=2e-4
    )


@pytest.mark.parametrize("weighting", diffusion.WEIGHTINGS)
@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
def test_dsm_loss_of_the_exact_score_is_lower_than_of_a_perturbed_one(parameterization, weighting):
    p = dataclasses.replace(PROCESSES["vp"], parameterization=parameterization, weighting=weighting)
    x0 = MU + jnp.sqrt(VAR) * jax.random.normal(jax.random.key(0), (4096, 2))
    perturbed = lambda x_hat, sigma: exact_denoiser(x_hat, sigma) + 0.05
    losses = [
        float(jnp.mean(diffusion.loss(p, _net_from_denoiser(p, d), x0, key=jax.random.key(1))))
        for d in (exact_denoiser, perturbed)
    ]
    assert losses[0] < losses[1]


def test_ema_update_is_its_formula():
    ema, params = {"w": jnp.ones(3)}, {"w": jnp.arange(3.0)}
    out = train.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["w"], 0.9 * 1.0 + 0.1 * np.arange(3.0), rtol=1e-6)


def _exact_marginal(sigma, key, n=8000):
    """x̂ at noise level σ for the Gaussian data: N(μ, v + σ²), where samplers start."""
    return MU + jnp.sqrt(VAR + sigma**2) * jax.random.normal(key, (n, 2))


SAMPLER_CASES = [
    ("heun", {}, 32),
    ("heun", {"churn": 10.0}, 64),
    # EDM's churn window: no noise outside it, where σ̂² − σ² once rounded below 0 (NaN).
    ("heun", {"churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}, 64),
    ("dpmpp2m", {}, 32),
    ("ddim", {"eta": 0.0}, 64),
    ("ddim", {"eta": 1.0}, 256),
    ("em", {}, 256),
    ("pc", {"snr": 0.16}, 256),
    ("ode", {}, 2),
]


@pytest.mark.parametrize(("name", "options", "steps"), SAMPLER_CASES)
def test_every_sampler_recovers_a_gaussian_from_its_exact_score(name, options, steps):
    p = PROCESSES["edm"]
    x = _exact_marginal(p.sigma_max, jax.random.key(0))
    sigmas = samplers.karras_sigmas(steps, p.sigma_min, p.sigma_max)
    sample = functools.partial(samplers.get(name), exact_denoiser, **options)
    out = np.asarray(jax.jit(lambda x, s, k: sample(x, s, key=k))(x, sigmas, jax.random.key(1)))
    np.testing.assert_allclose(out.mean(axis=0), MU, atol=0.06)
    np.testing.assert_allclose(np.cov(out.T), np.diag(VAR), atol=0.08 * float(VAR.max()))


def test_ddim_step_whose_noise_takes_all_of_the_next_level_stays_finite():
    # η = 1 from σ_max straight to σ_min: σ_up rounds to σ_next, and σ_next² − σ_up², fused
    # into an FMA, once rounded below 0 and made every sample NaN.
    p = PROCESSES["edm"]
    x = _exact_marginal(p.sigma_max, jax.random.key(0))
    sigmas = samplers.karras_sigmas(2, p.sigma_min, p.sigma_max)
    ancestral = functools.partial(samplers.ddim, exact_denoiser, eta=1.0)
    out = np.asarray(jax.jit(lambda x, k: ancestral(x, sigmas, key=k))(x, jax.random.key(1)))
    assert np.isfinite(out).all()
    # From σ_max one step lands on the data's mean: D(x̂, 80) ≈ μ for this Gaussian.
    np.testing.assert_allclose(out.mean(axis=0), MU, atol=0.06)


def test_samplers_on_a_vp_schedule_recover_the_gaussian_too():
    p = PROCESSES["vp"]
    x = _exact_marginal(p.sigma_max_effective, jax.random.key(0))
    out = samplers.heun(exact_denoiser, x, samplers.time_sigmas(p, 64), key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(out).mean(axis=0), MU, atol=0.06)
    np.testing.assert_allclose(np.cov(np.asarray(out).T), np.diag(VAR), atol=0.32)


def test_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'magic'"):
        samplers.get("magic")
    # One level: nothing to solve down to (it returned one denoising of the prior: ~μ).
    with pytest.raises(ValueError, match="use steps >= 2"):
        samplers.probability_flow(exact_denoiser, MU[None], samplers.karras_sigmas(1, 0.002, 80),
                                  key=None)  # fmt: skip
    with pytest.raises(ValueError, match="sde='cosine'"):
        diffusion.Process(sde="cosine")
    with pytest.raises(ValueError, match="t_min=0"):
        diffusion.Process(sde="vp", t_min=0)
    with pytest.raises(ValueError, match="sigma_data=0"):
        diffusion.Process(sigma_data=0)
    with pytest.raises(ValueError, match="parameterization='score'"):
        diffusion.Process(parameterization="score")
