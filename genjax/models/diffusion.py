"""Score-based diffusion: forward processes, the denoiser, denoising score matching.

Glossary: B batch, D data dimensions (any trailing shape: [2] for 2-D points,
[H, W, C] for images); t diffusion time in [t_min, 1]; σ noise level.

Every forward process perturbs data as x_t = s(t)·(x₀ + σ(t)·ε), ε ~ N(0, I):
a scale s(t) and a noise level σ(t) (Karras et al., 2022, Eq. 4). Written
that way, the probability-flow ODE, the samplers and the likelihood work on
x̂ = x_t / s(t), where every process is "x₀ plus σ of noise" and only σ
differs (``genjax.sampling.diffusion``):

    VE      s = 1,             σ(t) = σ_min·(σ_max/σ_min)^t           (Song et al., 2021)
    VP      s = e^{−B(t)/2},   σ(t) = sqrt(e^{B(t)} − 1)             B(t) = ∫₀ᵗ β, β linear
    sub-VP  s = e^{−B(t)/2},   σ(t) = e^{B(t)/2} − e^{−B(t)/2}        (its std is 1 − e^{−B})
    EDM     s = 1,             σ(t) = t, t in [σ_min, σ_max]          (Karras et al., 2022)

With x_t = s·x₀ + std·ε (std = s·σ), the network sees the noisy input and a
noise level and predicts ε (``"eps"``), x₀ (``"x0"``), v = s·ε − std·x₀
(``"v"``), or the EDM preconditioned output (``"edm"``: c_skip, c_out, c_in,
c_noise of the paper). ``denoise`` turns any of them into D(x̂, σ), the
estimate of x₀: the one quantity samplers use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

PROCESSES = ("ve", "vp", "subvp", "edm")
PARAMETERIZATIONS = ("edm", "eps", "x0", "v")
WEIGHTINGS = ("simple", "likelihood")


@dataclasses.dataclass(frozen=True)
class Process:
    """A forward process and how it is learned (the diffusion half of a model config)."""

    sde: str = "edm"  # ve | vp | subvp | edm
    parameterization: str = "edm"  # what the network predicts: edm | eps | x0 | v
    # "simple": squared error of what the network predicts; "likelihood": the score's
    # squared error weighted by g(t)², which bounds the negative log-likelihood.
    weighting: str = "simple"
    sigma_min: float = 0.002  # VE / EDM noise range
    sigma_max: float = 80.0
    beta_min: float = 0.1  # VP / sub-VP: β(t) = β_min + t·(β_max − β_min)
    beta_max: float = 20.0
    t_min: float = 1e-5  # VP / sub-VP: smallest time trained and sampled
    sigma_data: float = 0.5  # EDM preconditioning: the data's standard deviation
    p_mean: float = -1.2  # EDM training: ln σ ~ N(p_mean, p_std²)
    p_std: float = 1.2

    def __post_init__(self):
        for name, value, choices in [
            ("sde", self.sde, PROCESSES),
            ("parameterization", self.parameterization, PARAMETERIZATIONS),
            ("weighting", self.weighting, WEIGHTINGS),
        ]:
            if value not in choices:
                raise ValueError(f"diffusion: {name}={value!r}; choose one of {choices}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("diffusion: need 0 < sigma_min < sigma_max")
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError("diffusion: need 0 < beta_min < beta_max")
        if not 0 < self.t_min < 1:  # the likelihood's log σ(t_min) needs σ > 0
            raise ValueError(f"diffusion: t_min={self.t_min}; need 0 < t_min < 1")
        if self.sigma_data <= 0 or self.p_std <= 0:
            raise ValueError(
                f"diffusion: sigma_data={self.sigma_data} and p_std={self.p_std} must be > 0"
            )

    # ----------------------------------------------------------------- time and noise

    @property
    def t_range(self) -> tuple[float, float]:
        """The times a model is trained and sampled on."""
        if self.sde == "edm":
            return self.sigma_min, self.sigma_max
        if self.sde == "ve":
            return 0.0, 1.0
        return self.t_min, 1.0

    def _beta_integral(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def scale(self, t):
        """s(t): x_t = s(t)·(x₀ + σ(t)·ε)."""
        if self.sde in ("ve", "edm"):
            return jnp.ones_like(t)
        return jnp.exp(-0.5 * self._beta_integral(t))

    def sigma(self, t):
        """σ(t), the noise level of x̂ = x_t / s(t)."""
        if self.sde == "edm":
            return t
        if self.sde == "ve":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        b = self._beta_integral(t)
        if self.sde == "vp":
            return jnp.sqrt(jnp.expm1(b))
        return 2 * jnp.sinh(0.5 * b)  # sub-VP

    def t_of_sigma(self, sigma):
        """The inverse of ``sigma``."""
        if self.sde == "edm":
            return sigma
        if self.sde == "ve":
            return jnp.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        # B(t) from σ, then the positive root of ½(β_max − β_min)t² + β_min·t − B = 0.
        b = jnp.log1p(sigma**2) if self.sde == "vp" else 2 * jnp.arcsinh(0.5 * sigma)
        a = self.beta_max - self.beta_min
        return (-self.beta_min + jnp.sqrt(self.beta_min**2 + 2 * a * b)) / a

    def marginal(self, t):
        """(mean coefficient, std) of x_t given x₀: x_t ~ N(mean·x₀, std²·I)."""
        s = self.scale(t)
        return s, s * self.sigma(t)

    def sde_coefficients(self, t):
        """(f(t), g(t)²) of the forward SDE dx = f(t)·x dt + g(t) dw."""
        if self.sde == "edm":
            return jnp.zeros_like(t), 2 * t
        if self.sde == "ve":
            sigma = self.sigma(t)
            return jnp.zeros_like(t), 2 * sigma**2 * math.log(self.sigma_max / self.sigma_min)
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        if self.sde == "vp":
            return -0.5 * beta, beta
        return -0.5 * beta, beta * -jnp.expm1(-2 * self._beta_integral(t))  # sub-VP

    # ----------------------------------------------------------------- prior

    def sigma_range(self) -> tuple[float, float]:
        """(σ at the smallest time, σ at the largest): where sampling ends and starts."""
        with jax.ensure_compile_time_eval():  # host numbers, also while tracing
            return tuple(float(self.sigma(jnp.float32(t))) for t in self.t_range)

    @property
    def sigma_max_effective(self) -> float:
        """σ at the largest time: where sampling starts."""
        return self.sigma_range()[1]

    def prior_std(self) -> float:
        """Standard deviation of the prior in x̂ coordinates (x_T / s(T)).

        VP's prior N(0, I) in x_t is N(0, 1/s(T)²) = N(0, 1 + σ(T)²) in x̂; VE, sub-VP
        and EDM take N(0, σ(T)²), ignoring the data's own variance (score_sde's choice).
        """
        sigma_t = self.sigma_max_effective
        return math.sqrt(1 + sigma_t**2) if self.sde == "vp" else sigma_t

    def prior_sample(self, key, shape) -> jax.Array:
        """x̂_T: where every sampler starts."""
        return self.prior_std() * jax.random.normal(key, shape)

    def prior_logp(self, x_hat: jax.Array) -> jax.Array:
        """log N(x̂; 0, prior_std²) summed over all but the leading axis [B]."""
        d = math.prod(x_hat.shape[1:])
        var = self.prior_std() ** 2
        sq = jnp.sum(x_hat.reshape(x_hat.shape[0], -1) ** 2, axis=-1)
        return -0.5 * (sq / var + d * math.log(2 * math.pi * var))

    # ----------------------------------------------------------------- training times

    def sample_t(self, key, batch: int) -> jax.Array:
        """Training times [B]: EDM's log-normal σ, else uniform on the time range."""
        if self.sde == "edm":
            log_sigma = self.p_mean + self.p_std * jax.random.normal(key, (batch,))
            return jnp.clip(jnp.exp(log_sigma), self.sigma_min, self.sigma_max)
        lo, hi = self.t_range
        return jax.random.uniform(key, (batch,), minval=lo, maxval=hi)


Net = Callable[[jax.Array, jax.Array], jax.Array]  # (input [B, ...], noise input [B]) -> output


def _expand(v_B: jax.Array, like: jax.Array) -> jax.Array:
    return v_B.reshape(v_B.shape + (1,) * (like.ndim - 1))


def edm_coefficients(p: Process, sigma_B):
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning (Karras et al., Table 1)."""
    sd2 = p.sigma_data**2
    c_skip = sd2 / (sigma_B**2 + sd2)
    c_out = sigma_B * p.sigma_data / jnp.sqrt(sigma_B**2 + sd2)
    c_in = 1 / jnp.sqrt(sigma_B**2 + sd2)
    return c_skip, c_out, c_in, 0.25 * jnp.log(sigma_B)


def denoise(p: Process, net: Net, x_hat: jax.Array, sigma_B: jax.Array) -> jax.Array:
    """D(x̂, σ): the estimate of x₀ from x̂ = x₀ + σ·ε, by whatever the net predicts.

    The net sees x_t = s·x̂ and its time t (``eps``, ``x0``, ``v``), or EDM's
    c_in·x̂ and c_noise (``edm``).
    """
    if p.parameterization == "edm":
        c_skip, c_out, c_in, c_noise = edm_coefficients(p, sigma_B)
        out = net(_expand(c_in, x_hat) * x_hat, c_noise)
        return _expand(c_skip, x_hat) * x_hat + _expand(c_out, x_hat) * out
    t_B = p.t_of_sigma(sigma_B)
    s_B, std_B = p.marginal(t_B)
    s, std = _expand(s_B, x_hat), _expand(std_B, x_hat)
    x_t = s * x_hat
    out = net(x_t, t_B)
    if p.parameterization == "eps":
        return (x_t - std * out) / s
    if p.parameterization == "x0":
        return out
    return (s * x_t - std * out) / (s**2 + std**2)  # v → x₀: s·x_t − std·v = (s² + std²)·x₀


def prediction_target(p: Process, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
    """What the net should output for x_t = s·x₀ + std·ε (``eps``/``x0``/``v``)."""
    s_B, std_B = p.marginal(t_B)
    s, std = _expand(s_B, x0), _expand(std_B, x0)
    if p.parameterization == "eps":
        return eps
    if p.parameterization == "x0":
        return x0
    return s * eps - std * x0  # v


def loss(p: Process, net: Net, x0: jax.Array, *, key: jax.Array) -> jax.Array:
    """Denoising score matching, per example [B]:

        E_t,ε  λ(t) ‖D(x̂_t, σ_t) − x₀‖²  in the net's own units,

    for EDM ‖F(c_in x̂, c_noise) − (x₀ − c_skip x̂)/c_out‖² (its λ makes the target
    unit-variance); for ε, x₀ or v the squared error of that prediction ("simple"),
    or, with ``weighting="likelihood"``, g(t)²·‖s_θ − ∇log p_t‖², the score's error
    weighted as in the bound on the negative log-likelihood (Song et al., 2021).
    """
    k_t, k_eps = jax.random.split(key)
    t_B = p.sample_t(k_t, x0.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    sigma_B = p.sigma(t_B)
    x_hat = x0 + _expand(sigma_B, x0) * eps
    axes = tuple(range(1, x0.ndim))
    if p.weighting == "likelihood":
        # ∇log p_t(x_t) = −(x_t − s·x₀)/std², so the score's error is s·(D − x₀)/std².
        s_B, std_B = p.marginal(t_B)
        _, g2_B = p.sde_coefficients(t_B)
        err = jnp.sum((denoise(p, net, x_hat, sigma_B) - x0) ** 2, axis=axes)
        return g2_B * s_B**2 / std_B**4 * err
    if p.parameterization == "edm":
        c_skip, c_out, c_in, c_noise = edm_coefficients(p, sigma_B)
        target = (x0 - _expand(c_skip, x0) * x_hat) / _expand(c_out, x0)
        out = net(_expand(c_in, x0) * x_hat, c_noise)
        return jnp.mean((out - target) ** 2, axis=axes)
    s_B, _ = p.marginal(t_B)
    out = net(_expand(s_B, x0) * x_hat, t_B)
    return jnp.mean((out - prediction_target(p, x0, eps, t_B)) ** 2, axis=axes)
