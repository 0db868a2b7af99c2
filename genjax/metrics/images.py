"""Sample metrics for images by the BENCHMARKS protocol, scored next to a real-vs-real floor.

Glossary: N samples, M reference images, F feature width (128), K classes,
D = H·W·C image dimensions.

Features are the penultimate layer of a small classifier trained here on the
train split (an MLP D→256→128→K with SiLU; ``train_classifier``), the digits
stand-in for Inception. In those features: Fréchet distance and KID, precision
and recall (k = 3), density and coverage (k = 5); from its predictions: class
coverage and the KL of the predicted-class histogram to uniform (and, for
class-conditional samples, how often a sample is classified as the class it
was drawn for).

The reference is always the test split (360 digits), which the classifier
never saw. Every metric depends on the sample count, so ``real_floor`` scores
``num`` real train images against the same reference (the protocol's "train
subset vs test"): the number to print beside each score. The classifier was
fitted on those train images, so the floor is what reproducing the training set
scores, not quite what fresh draws from the data distribution would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.spatial.distance import cdist

from genjax.data.images import Images, to_unit

WIDTHS = (256, 128)  # hidden widths; the last is the feature width F


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained MLP over flattened images in [−1, 1]."""

    params: dict  # {"hidden": [{"w", "b"}, ...], "out": {"w", "b"}}
    test_accuracy: float  # on images.test
    train_seconds: float  # compile included

    def features(self, x_unit: jax.Array) -> np.ndarray:
        """[N, H, W, C] in [−1, 1] to penultimate features [N, F]."""
        return np.asarray(_forward(self.params, jnp.asarray(x_unit))[0])

    def probs(self, x_unit: jax.Array) -> np.ndarray:
        """[N, H, W, C] in [−1, 1] to class probabilities [N, K]."""
        return np.asarray(jax.nn.softmax(_forward(self.params, jnp.asarray(x_unit))[1]))


def init_params(key: jax.Array, dims: int, num_classes: int) -> dict:
    """The MLP D → 256 → 128 → K: LeCun-normal weights, zero biases."""
    sizes = (dims, *WIDTHS, num_classes)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = [
        {"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]
    return {"hidden": layers[:-1], "out": layers[-1]}


@jax.jit
def _forward(params: dict, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(features [B, F], logits [B, K])."""
    h_BD = x_BHWC.reshape(len(x_BHWC), -1)
    for layer in params["hidden"]:
        h_BD = jax.nn.silu(h_BD @ layer["w"] + layer["b"])
    return h_BD, h_BD @ params["out"]["w"] + params["out"]["b"]


def _loss(params: dict, x_BHWC: jax.Array, y_B: jax.Array) -> jax.Array:
    logits_BK = _forward(params, x_BHWC)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits_BK, y_B).mean()


_CLASSIFIERS: dict[tuple, Classifier] = {}


def train_classifier(images: Images, *, seed: int = 0, steps: int = 500) -> Classifier:
    """The feature classifier: full-batch AdamW on ``images.train`` from ``seed``,
    deterministic, trained once per (images, seed, steps) in this process."""
    if images.train_labels is None:
        raise ValueError(
            f"{images.name} has no labels; the classifier metrics need labelled images"
        )
    # The name alone is not enough: a .npy path can be rewritten between loads.
    digest = hashlib.sha1(images.train.tobytes() + images.train_labels.tobytes()).hexdigest()
    cache_key = (images.name, digest, seed, steps)
    if cache_key not in _CLASSIFIERS:
        _CLASSIFIERS[cache_key] = _train(images, seed, steps)
    return _CLASSIFIERS[cache_key]


def _train(images: Images, seed: int, steps: int) -> Classifier:
    start = time.perf_counter()
    x_BHWC = jnp.asarray(to_unit(images.train, images.levels))
    y_B = jnp.asarray(images.train_labels)
    optimizer = optax.adamw(3e-3, weight_decay=1e-2)

    @jax.jit
    def fit(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(_loss)(params, x_BHWC, y_B)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), length=steps)[0][0]

    params = fit(init_params(jax.random.key(seed), images.dims, images.num_classes))
    logits_MK = _forward(params, jnp.asarray(to_unit(images.test, images.levels)))[1]
    accuracy = float(np.mean(np.asarray(logits_MK).argmax(axis=1) == images.test_labels))
    return Classifier(params, accuracy, time.perf_counter() - start)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to two
    feature sets [N, F] and [M, F] (Heusel et al., 2017, "GANs trained by a two
    time-scale update rule converge to a local Nash equilibrium")."""
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (Σ_a Σ_b)^½ is the sum of the square roots of the eigenvalues of
    # Σ_a^½ Σ_b Σ_a^½, which is symmetric PSD: eigh never yields the complex
    # parts or NaNs that sqrtm of the non-symmetric product can on singular covariances.
    eig_a, vec_a = np.linalg.eigh(cov_a)
    sqrt_a = (vec_a * np.sqrt(eig_a.clip(0))) @ vec_a.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(eig.clip(0)).sum()
    mean_term = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    distance = mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # a set against itself can round to −1e−12


def kid(
    feat_a: np.ndarray,
    feat_b: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel inception distance: the unbiased MMD² with the cubic kernel
    k(x, y) = (x·y/F + 1)³, averaged over random subsets of
    min(subset_size, N, M) points drawn without replacement from each set
    (Bińkowski et al., 2018, "Demystifying MMD GANs")."""
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    kernel = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3
    estimates = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        # Off-diagonal sums only: k(x, x) terms would bias the estimate upward.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.mean())
    return float(np.mean(estimates))


def _knn_radii(feat: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point [N, F] to its k-th nearest other point [N]."""
    d_NN = cdist(feat, feat)
    # Column 0 of the sorted row is the point itself (distance 0), so index k is the k-th other.
    return np.partition(d_NN, k, axis=1)[:, k]


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> dict[str, float]:
    """Precision: the fraction of fake points inside the real manifold (the union
    of balls around each real point reaching its k-th nearest real neighbour);
    recall: the fraction of real points inside the fake manifold (Kynkäänniemi
    et al., 2019, "Improved precision and recall metric for assessing generative models")."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d_RF = cdist(real, fake)
    precision = (d_RF <= _knn_radii(real, k)[:, None]).any(axis=0).mean()
    recall = (d_RF <= _knn_radii(fake, k)[None, :]).any(axis=1).mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Density: how many real k-NN balls hold each fake point, divided by k (1 on
    average when fake matches real; above 1 when samples crowd dense regions);
    coverage: the fraction of real balls holding at least one fake point (Naeem
    et al., 2020, "Reliable fidelity and diversity metrics for generative models")."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    inside_RF = cdist(real, fake) <= _knn_radii(real, k)[:, None]
    density = inside_RF.sum(axis=0).mean() / k
    coverage = inside_RF.any(axis=1).mean()
    return {"density": float(density), "coverage": float(coverage)}


def class_histogram_metrics(probs: np.ndarray, num_classes: int) -> dict[str, float]:
    """Of the predicted (argmax) classes of samples [N, K]: class coverage, the
    fraction of classes predicted for at least one sample, and class KL,
    KL(histogram ‖ uniform) in nats (the reverse KL of genjax.metrics.modes)."""
    counts_K = np.bincount(np.asarray(probs).argmax(axis=1), minlength=num_classes)
    p_K = counts_K / max(counts_K.sum(), 1)
    used = p_K > 0
    kl = float(np.sum(p_K[used] * np.log(p_K[used] * num_classes)))
    return {"class_coverage": float(used.mean()), "class_kl": kl if used.any() else float("inf")}


def conditional_accuracy(probs: np.ndarray, intended_labels: np.ndarray) -> float:
    """The fraction of class-conditional samples [N, K] classified as the class
    they were drawn for [N]."""
    return float(np.mean(np.asarray(probs).argmax(axis=1) == np.asarray(intended_labels)))


def image_metrics(
    samples_unit: np.ndarray,
    images: Images,
    classifier: Classifier,
    *,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Every metric of samples [N, H, W, C] in [−1, 1] against the test split;
    ``labels`` [N], the classes conditional samples were drawn for, adds
    "conditional_accuracy"; ``seed`` picks KID's subsets."""
    samples_unit = np.asarray(samples_unit, np.float32)
    if samples_unit.shape[1:] != images.shape or len(samples_unit) < 2:
        raise ValueError(
            f"samples have shape {samples_unit.shape}; expected [N ≥ 2, *{images.shape}]"
        )
    real_MF = classifier.features(to_unit(images.test, images.levels))
    fake_NF = classifier.features(samples_unit)
    probs_NK = classifier.probs(samples_unit)
    metrics = {
        "frechet_distance": frechet_distance(fake_NF, real_MF),
        "kid": kid(fake_NF, real_MF, seed=seed),
        **precision_recall(real_MF, fake_NF, k=3),
        **density_coverage(real_MF, fake_NF, k=5),
        **class_histogram_metrics(probs_NK, images.num_classes),
    }
    if labels is not None:
        metrics["conditional_accuracy"] = conditional_accuracy(probs_NK, labels)
    return metrics


def real_floor(
    images: Images, classifier: Classifier, num: int, *, seed: int = 0, draws: int = 5
) -> dict[str, float]:
    """``image_metrics`` of ``num`` train images against the test split, the mean over
    ``draws`` sets drawn without replacement (at seeds ``seed``, ``seed + 1``, …): the
    real-vs-real floor at that sample count. One set's scores move with the draw (the
    digits' FD at 1,000 images: 7.39 to 9.82 over five draws), so the spread of its FD
    comes too: "frechet_distance_min" and "frechet_distance_max". Its
    "conditional_accuracy" is the classifier's test accuracy, since it has seen the train
    images.

    ``num`` is at most the train split's size: resampling real images with
    replacement would put exact duplicates in the set, which no perfect sampler
    produces and which shrink recall's k-NN balls, so such a floor would be wrong.
    """
    if not 2 <= num <= len(images.train):
        raise ValueError(
            f"num={num}; the real-vs-real floor needs 2..{len(images.train)} train images, "
            "so score at most that many samples"
        )
    if draws < 1:
        raise ValueError(f"draws={draws}; the floor needs at least one set of train images")
    scores = []
    for draw_seed in range(seed, seed + draws):
        index = np.random.default_rng(draw_seed).choice(len(images.train), num, replace=False)
        real_unit = to_unit(images.train[index], images.levels)
        scores.append(image_metrics(real_unit, images, classifier, seed=draw_seed))
    floor = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    fds = [s["frechet_distance"] for s in scores]
    return {
        **floor,
        "frechet_distance_min": min(fds),
        "frechet_distance_max": max(fds),
        "conditional_accuracy": classifier.test_accuracy,
    }
