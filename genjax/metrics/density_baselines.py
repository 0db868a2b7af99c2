"""scikit-learn density models of images: what a model's test bits/dim is set beside.

Each is fitted on the uniformly dequantized train split and scored on the dequantized
test split (``genjax.data.images.dequantize`` at fixed keys, [−1, 1]), and its per-image
log-densities become bits/dim by ``genjax.data.images.bits_per_dim``, as genjax's own:

    GaussianMixture   full covariance, random_state 0: k = 10, and k chosen by 5-fold
                      cross-validated likelihood on the train split over ``gmm_ks``
    KernelDensity     Gaussian, its bandwidth chosen the same way over 20 values
"""

from __future__ import annotations

import jax
import numpy as np

from genjax.data import images as imagelib


def dequantized(x_int: np.ndarray, levels: int, seed: int) -> np.ndarray:
    """[N, D] uniformly dequantized images in [−1, 1], genjax's map at a fixed key."""
    x = imagelib.dequantize(x_int, levels, key=jax.random.key(seed))
    return np.asarray(x, np.float64).reshape(len(x_int), -1)


def baselines(images: imagelib.Images, gmm_ks: list[int]) -> list[tuple[str, float, str]]:
    """(model, test bits/dim, how it was chosen) of each scikit-learn density model."""
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neighbors import KernelDensity

    train = dequantized(images.train, images.levels, seed=1)
    test = dequantized(images.test, images.levels, seed=2)
    bits = lambda model: float(
        np.mean(imagelib.bits_per_dim(-model.score_samples(test), images.dims, images.levels))
    )
    folds = KFold(5, shuffle=True, random_state=0)
    gmm = lambda k: GaussianMixture(k, covariance_type="full", random_state=0)
    rows = [("GaussianMixture, k = 10, full covariance", bits(gmm(10).fit(train)), "fixed")]
    # Both searches score held-out folds by mean log-likelihood (the models' .score).
    search = GridSearchCV(gmm(1), {"n_components": gmm_ks}, cv=folds).fit(train)
    k = search.best_params_["n_components"]
    rows.append((f"GaussianMixture, k = {k}, full covariance", bits(search.best_estimator_),
                 f"5-fold CV on train over k in {gmm_ks}"))  # fmt: skip
    grid = np.geomspace(0.02, 1.0, 20)
    search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": grid}, cv=folds)
    search.fit(train)
    bandwidth = search.best_params_["bandwidth"]
    rows.append((f"KernelDensity, Gaussian, bandwidth {bandwidth:.3f}",
                 bits(search.best_estimator_),
                 "5-fold CV on train over 20 bandwidths, 0.02–1 (geometric)"))  # fmt: skip
    return rows
