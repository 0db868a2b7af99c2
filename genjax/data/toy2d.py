"""Exact 2-D mixtures of Gaussians: the ring and the grid of the PacGAN / VEEGAN protocol.

    ring: 8 modes at angles 2πk/8 (k = 0..7) on the unit circle, std 0.01
    grid: 25 modes at {−4, −2, 0, 2, 4}², std 0.05

``linspace(0, 2π, 8)`` would repeat the first angle and give 7 modes; the
angles here are 2πk/8. Each mixture is equally weighted, so its exact
log-density is a log-mean-exp of isotropic Gaussians.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Mixture:
    """An equally weighted mixture of isotropic 2-D Gaussians."""

    name: str
    means: np.ndarray  # [M, 2]
    std: float

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` float32 points [n, 2] drawn with numpy's generator at ``seed``."""
        rng = np.random.default_rng(seed)
        modes = rng.integers(0, len(self.means), n)
        return (self.means[modes] + self.std * rng.standard_normal((n, 2))).astype(np.float32)

    @property
    def spread(self) -> float:
        """The exact standard deviation of one coordinate (the means are centred)."""
        return float(np.sqrt(np.mean(self.means**2) + self.std**2))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Exact log-density of points [N, 2] (float64), in nats."""
        x = np.asarray(x, np.float64)
        d2 = np.sum((x[:, None, :] - self.means[None]) ** 2, axis=-1)  # [N, M]
        log_gauss = -d2 / (2 * self.std**2) - np.log(2 * np.pi * self.std**2)
        top = log_gauss.max(axis=1, keepdims=True)
        log_mean = np.log(np.mean(np.exp(log_gauss - top), axis=1))
        return log_mean + top[:, 0]


def ring() -> Mixture:
    angles = 2 * np.pi * np.arange(8) / 8
    return Mixture("ring", np.stack([np.cos(angles), np.sin(angles)], axis=1), 0.01)


def grid() -> Mixture:
    coords = np.arange(-4.0, 5.0, 2.0)
    means = np.stack(np.meshgrid(coords, coords, indexing="ij"), axis=-1).reshape(-1, 2)
    return Mixture("grid", means, 0.05)


DATASETS = {"ring": ring, "grid": grid}


def get(name: str) -> Mixture:
    if name not in DATASETS:
        raise ValueError(f"unknown 2-D dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]()
