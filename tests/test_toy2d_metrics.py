"""2-D mixtures and the PacGAN mode metrics, against their closed forms."""

import numpy as np
import pytest

from genjax.data import toy2d
from genjax.metrics.modes import mode_metrics


def test_mixtures_have_the_published_modes():
    ring, grid = toy2d.ring(), toy2d.grid()
    assert len(ring.means) == 8 and len(np.unique(np.round(ring.means, 6), axis=0)) == 8
    np.testing.assert_allclose(np.linalg.norm(ring.means, axis=1), 1.0)
    assert len(grid.means) == 25 and set(grid.means.ravel()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    assert (ring.std, grid.std) == (0.01, 0.05)
    with pytest.raises(ValueError, match="unknown 2-D dataset 'spiral'"):
        toy2d.get("spiral")


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_log_prob_is_a_normalized_density(name):
    mixture = toy2d.get(name)
    # Monte-Carlo: E_p[1/p] over a box covering all mass equals the box's area.
    x = mixture.sample(4000, seed=0)
    assert np.isfinite(mixture.log_prob(x)).all()
    # Integrate on a fine grid around one mode: each holds 1/M of the mass.
    mode, h = mixture.means[0], mixture.std / 20
    axis = np.arange(-6 * mixture.std, 6 * mixture.std, h)
    pts = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2) + mode
    mass = np.exp(mixture.log_prob(pts)).sum() * h * h
    np.testing.assert_allclose(mass, 1 / len(mixture.means), rtol=1e-3)


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_a_perfect_sampler_scores_as_the_protocol_says(name):
    mixture = toy2d.get(name)
    scores = [mode_metrics(mixture.sample(2500, seed=s), mixture) for s in range(5)]
    assert all(s["modes"] == len(mixture.means) for s in scores)
    hq = np.mean([s["high_quality"] for s in scores])
    assert abs(hq - (1 - np.exp(-4.5))) < 0.005  # 98.9%
    assert max(s["reverse_kl"] for s in scores) < 0.02


def test_collapsed_and_off_mode_samples_are_penalized():
    ring = toy2d.ring()
    one_mode = np.tile(ring.means[:1], (100, 1))
    s = mode_metrics(one_mode, ring)
    assert s["modes"] == 1 and s["high_quality"] == 1.0
    np.testing.assert_allclose(s["reverse_kl"], np.log(8))
    far = mode_metrics(np.zeros((10, 2)), ring)  # the ring's centre: nowhere near a mode
    assert far == {"modes": 0, "high_quality": 0.0, "reverse_kl": float("inf")}
