"""Diffusion samplers: each a short function over a decreasing σ schedule.

    sampler(denoiser, x, sigmas, *, key, **options) -> x

``x`` starts as the prior's draw (``Process.prior_sample``) in the coordinates
x̂ = x₀ + σ·ε of ``genjax.models.diffusion``; ``sigmas`` [N + 1] decrease from
the first noise level to 0; ``denoiser(x̂ [B, ...], σ [B]) -> x₀ estimate``
owns the network and its preconditioning, so no sampler knows what the network
predicts or which process trained it (the design of k-diffusion and EDM). Each
sampler is one ``lax.scan`` over its steps: jit it once, batch it, shard its
batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from genjax.models.diffusion import Process

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- schedules


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> jax.Array:
    """EDM's schedule: n levels evenly spaced in σ^(1/ρ) from σ_max to σ_min, then 0."""
    ramp = jnp.linspace(0, 1, n)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return jnp.append(inv**rho, 0.0)


def time_sigmas(p: Process, n: int) -> jax.Array:
    """n levels at times evenly spaced from the process's last time to its first, then 0
    (score_sde's discretization of its SDEs)."""
    lo, hi = p.t_range
    return jnp.append(p.sigma(jnp.linspace(hi, lo, n)), 0.0)


def _at(sigma, x: jax.Array) -> jax.Array:
    """A scalar σ as the per-example vector [B] a denoiser takes."""
    return jnp.full((x.shape[0],), sigma, x.dtype)


def _steps(sigmas: jax.Array, key: jax.Array):
    """(σ_i, σ_i+1, key_i) for every step, as scan inputs."""
    return sigmas[:-1], sigmas[1:], jax.random.split(key, len(sigmas) - 1)


def _safe(sigma):
    """σ where it is positive, else 1: the branch taken at σ = 0 never divides by 0."""
    return jnp.where(sigma > 0, sigma, 1.0)


# ----------------------------------------------------------------------------- samplers


def euler_maruyama(denoiser: Denoiser, x, sigmas, *, key) -> jax.Array:
    """The reverse SDE of x̂ (dx̂ = −d[σ²] ∇log p dt + d[σ] dw̄), one Euler–Maruyama
    step per level: score_sde's reverse-diffusion predictor. The last step returns
    its mean (no noise is added on the way to σ = 0)."""

    def step(x, inputs):
        sigma, sigma_next, k = inputs
        score = (denoiser(x, _at(sigma, x)) - x) / sigma**2
        var = sigma**2 - sigma_next**2
        x = x + var * score
        noise = jnp.sqrt(var) * jax.random.normal(k, x.shape, x.dtype)
        return jnp.where(sigma_next > 0, x + noise, x), None

    return jax.lax.scan(step, x, _steps(sigmas, key))[0]


def ddim(denoiser: Denoiser, x, sigmas, *, key, eta: float = 0.0) -> jax.Array:
    """DDIM (Song et al., 2021) in x̂: a step toward the denoised estimate that keeps
    a share η of fresh noise. η = 0 is deterministic (Euler on the probability-flow
    ODE); η = 1 is ancestral sampling (DDPM)."""

    def step(x, inputs):
        sigma, sigma_next, k = inputs
        denoised = denoiser(x, _at(sigma, x))
        up = jnp.minimum(
            sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2)) / sigma
        )
        # Where σ_up is σ_next, σ_next² − σ_up² fused into an FMA can round below 0.
        down = jnp.sqrt(jnp.maximum(sigma_next**2 - up**2, 0.0))
        x = denoised + down * (x - denoised) / sigma
        return x + up * jax.random.normal(k, x.shape, x.dtype), None

    return jax.lax.scan(step, x, _steps(sigmas, key))[0]


def heun(
    denoiser: Denoiser,
    x,
    sigmas,
    *,
    key,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> jax.Array:
    """EDM's sampler (Karras et al., 2022, Algorithm 2): Heun's second-order step on
    the probability-flow ODE, Euler on the last; ``churn`` > 0 first adds noise,
    raising σ by a factor 1 + γ, γ = min(churn / N, √2 − 1), for σ in [s_tmin, s_tmax]."""
    n = len(sigmas) - 1
    gamma_max = min(churn / n, math.sqrt(2) - 1)

    def step(x, inputs):
        sigma, sigma_next, k = inputs
        gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1 + gamma)
        z = jax.random.normal(k, x.shape, x.dtype)
        # sqrt(σ̂² − σ²) as σ·sqrt(γ(2 + γ)): at γ = 0 the difference of squares, fused
        # into an FMA, can round below zero, and its square root is NaN.
        x_hat = x + sigma * jnp.sqrt(gamma * (2 + gamma)) * s_noise * z
        d = (x_hat - denoiser(x_hat, _at(sigma_hat, x))) / sigma_hat
        x_euler = x_hat + (sigma_next - sigma_hat) * d
        # The correction is computed everywhere and used where σ_next > 0.
        d_next = (x_euler - denoiser(x_euler, _at(_safe(sigma_next), x))) / _safe(sigma_next)
        x_heun = x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        return jnp.where(sigma_next > 0, x_heun, x_euler), None

    return jax.lax.scan(step, x, _steps(sigmas, key))[0]


def dpmpp_2m(denoiser: Denoiser, x, sigmas, *, key) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al., 2022): multistep second order in log σ, reusing
    the previous step's denoised estimate; first order on the first and last steps.
    Deterministic: ``key`` only feeds the scan's unused per-step keys."""

    def step(carry, inputs):
        x, old_denoised, sigma_prev = carry
        sigma, sigma_next, _ = inputs
        denoised = denoiser(x, _at(sigma, x))
        h = jnp.log(sigma / _safe(sigma_next))
        r = jnp.log(sigma_prev / sigma) / h  # h_last / h
        second = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        use_second = (sigma_prev > sigma) & (sigma_next > 0)
        d = jnp.where(use_second, second, denoised)
        ratio = sigma_next / sigma  # e^{−h}
        return (ratio * x + (1 - ratio) * d, denoised, sigma), None

    first = sigmas[0]  # sigma_prev == sigma on the first step: first order
    carry = (x, jnp.zeros_like(x), first)
    return jax.lax.scan(step, carry, _steps(sigmas, key))[0][0]


def predictor_corrector(
    denoiser: Denoiser, x, sigmas, *, key, snr: float = 0.16, corrector_steps: int = 1
) -> jax.Array:
    """score_sde's PC sampler in x̂: at each level, Langevin corrector steps whose size
    follows the signal-to-noise ratio ``snr``, then a reverse-diffusion predictor step."""

    def correct(x, sigma, k):
        grad = (denoiser(x, _at(sigma, x)) - x) / sigma**2
        z = jax.random.normal(k, x.shape, x.dtype)
        norm = lambda v: jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))
        size = 2 * (snr * norm(z) / norm(grad)) ** 2
        return x + size * grad + jnp.sqrt(2 * size) * z

    def step(x, inputs):
        sigma, sigma_next, k = inputs
        keys = jax.random.split(k, corrector_steps + 1)
        for i in range(corrector_steps):
            x = correct(x, sigma, keys[i])
        return euler_maruyama(denoiser, x, jnp.stack([sigma, sigma_next]), key=keys[-1]), None

    return jax.lax.scan(step, x, _steps(sigmas, key))[0]


def probability_flow(
    denoiser: Denoiser,
    x,
    sigmas,
    *,
    key,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
) -> jax.Array:
    """The probability-flow ODE dx̂/dσ = (x̂ − D(x̂, σ))/σ from σ = sigmas[0] down to
    the last positive level, by an adaptive Dormand–Prince solve (diffrax), then one
    denoising step to σ = 0. One solve for the whole batch: every example and device
    takes the same steps. Only the first and last positive levels matter: any
    schedule of two levels or more gives the same solve."""
    del key  # deterministic
    if len(sigmas) < 3:
        raise ValueError(
            f"the ode sampler solves from the first noise level down to the last positive "
            f"one; a schedule of {len(sigmas) - 1} level has none below the first: use "
            "steps >= 2 (its solver picks its own steps in between)"
        )
    sigma_end = sigmas[-2]
    term = diffrax.ODETerm(lambda sigma, y, _: (y - denoiser(y, _at(sigma, y))) / sigma)
    solution = diffrax.diffeqsolve(
        term,
        diffrax.Dopri5(),
        t0=sigmas[0],
        t1=sigma_end,
        dt0=None,
        y0=x,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    x_end = solution.ys[-1]
    return denoiser(x_end, _at(sigma_end, x_end))


SAMPLERS = {
    "heun": heun,
    "dpmpp2m": dpmpp_2m,
    "ddim": ddim,
    "pc": predictor_corrector,
    "ode": probability_flow,
    "em": euler_maruyama,
}


def get(name: str) -> Callable[..., jax.Array]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
