"""The probability-flow likelihood against a Gaussian's analytic log-density: exact
divergence, Hutchinson's estimate, and a batch sharded over eight devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genjax.evaluate import make_eval_mesh
from genjax.models import diffusion
from genjax.sampling.likelihood import log_likelihood

# Data N(μ, Σ) with a full covariance Σ = R·diag(v)·Rᵀ (Hutchinson's Rademacher probe
# would be exact for a diagonal one); its denoiser is E[x₀ | x̂] = μ + Σ(Σ + σ²I)⁻¹(x̂ − μ).
# Centred: the prior N(0, σ_max²I) ignores the data's mean, which would cost
# x̂_T·μ/σ_max² ≈ 0.01 nats here (and any model as much), not the solver's error.
MU = jnp.zeros(6)
VAR = jnp.array([0.25, 0.5, 1.0, 0.1, 0.3, 0.8])
PROCESS = diffusion.Process(sde="edm", sigma_max=80.0)


def gaussian(dims):
    rotation, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(7), (dims, dims)))
    mu, cov = MU[:dims], rotation @ jnp.diag(VAR[:dims]) @ rotation.T
    eye = jnp.eye(dims)

    def denoiser(x_hat, sigma_B):
        gain_BDD = cov @ jnp.linalg.inv(cov + sigma_B[:, None, None] ** 2 * eye)
        return mu + jnp.einsum("BDE,BE->BD", gain_BDD, x_hat - mu)

    def log_density(x):  # of x̂ at the smallest noise level, where the solve starts
        c = cov + PROCESS.sigma_range()[0] ** 2 * eye
        d = x - mu
        mahalanobis = jnp.einsum("BD,DE,BE->B", d, jnp.linalg.inv(c), d)
        return -0.5 * (mahalanobis + jnp.linalg.slogdet(2 * jnp.pi * c)[1])

    x = mu + jax.random.normal(jax.random.key(1), (16, dims)) @ jnp.linalg.cholesky(cov).T
    return denoiser, log_density, x


def test_exact_divergence_recovers_a_gaussian_log_density():
    denoiser, log_density, x = gaussian(2)
    logp = jax.jit(lambda x: log_likelihood(denoiser, PROCESS, x, key=jax.random.key(0)))(x)
    # The prior N(0, 80²) stands in for N(0, v + 80²): off by ~1e-4 nats here.
    np.testing.assert_allclose(logp, log_density(x), atol=2e-3)


def test_hutchinson_estimate_is_unbiased():
    denoiser, log_density, x = gaussian(6)
    one = jax.jit(lambda x, k: log_likelihood(denoiser, PROCESS, x, key=k, exact=False))
    estimates = np.stack([one(x, jax.random.key(i)) for i in range(16)])
    assert np.std(estimates[:, 0]) > 1e-3  # a real estimate, not the exact trace
    # The mean over 16 probes: its error shrinks as 1/4 of one probe's spread.
    np.testing.assert_allclose(
        estimates.mean(0), log_density(x), atol=0.6 * np.std(estimates, 0).max()
    )
    exact = log_likelihood(denoiser, PROCESS, x, key=jax.random.key(0), exact=True)
    np.testing.assert_allclose(exact, log_density(x), atol=2e-3)


@pytest.mark.parametrize("exact", [True, False])
def test_sharded_batch_equals_one_device(exact):
    denoiser, _, x = gaussian(6)
    fn = jax.jit(lambda x: log_likelihood(denoiser, PROCESS, x, key=jax.random.key(3), exact=exact))
    one = fn(jax.device_put(x, jax.devices()[0]))
    mesh = make_eval_mesh()
    sharded = fn(jax.device_put(x, NamedSharding(mesh, P("batch"))))
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)
