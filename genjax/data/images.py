"""Image data for diffusion, VAEs and GANs: scikit-learn's digits or the user's own array.

Glossary: N train images, M test images, B batch, H height, W width, C channels,
D = H·W·C dimensions, L gray levels (17 for digits: values 0..16; 256 for uint8 photos).

Images are kept as integer levels 0..L−1, the data's own scale. Models see
``to_unit`` values in [−1, 1] (level k ↦ 2k/(L−1) − 1, so 0 and L−1 land on the
ends); samples go back with ``to_levels``. Likelihoods are measured on
``dequantize``d data, where level k fills the bin of width 2/(L−1) centred on its
training value 2k/(L−1) − 1, and ``bits_per_dim`` turns a density there into bits per
dimension of the discrete images (score_sde puts the bins at 2k/L − 1 instead).

Every source is split 80/20 by ``train_test_split(..., test_size=0.2,
random_state=0)``: digits gives 1,437 train and 360 test images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from genjax.data import rows

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class Images:
    """A train/test split of integer-level images, with labels when there are any."""

    name: str  # "digits" or the .npy path
    train: np.ndarray  # [N, H, W, C] uint8 (int32 when levels > 256), values 0..levels−1
    test: np.ndarray  # [M, H, W, C]
    train_labels: np.ndarray | None  # [N] int32, or None when unlabelled
    test_labels: np.ndarray | None  # [M] int32
    levels: int  # gray levels: 17 for digits, 256 for uint8 photos
    class_names: tuple[str, ...]  # () when unlabelled

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape[1:]

    @property
    def dims(self) -> int:
        return math.prod(self.shape)


def load(source: str = "digits", *, labels: str | None = None, levels: int | None = None) -> Images:
    """``"digits"`` (8×8×1, 17 levels, labels 0–9) or a path to a ``.npy`` [N, H, W, C] array.

    A user array is uint8 (256 levels unless ``levels`` says fewer) or another
    integer type, which needs ``levels`` (values 0..levels−1): the number of
    gray levels sets bits/dim, so it is not guessed from the largest value.
    ``labels`` is an optional ``.npy`` [N] of non-negative integers; class
    names are the words "zero".."nine" when every label is below 10, else "0", "1", ….
    """
    if source == "digits":
        if labels is not None or levels is not None:
            raise ValueError("digits has its own labels and 17 levels; pass neither")
        return _digits()
    if not source.endswith(".npy"):
        raise ValueError(
            f"unknown image source {source!r}; use 'digits' or a path to an [N, H, W, C] .npy file"
        )
    x = _load_npy(source, "images")
    levels = _check_images(x, levels)
    y = None if labels is None else _check_labels(_load_npy(labels, "labels"), len(x))
    names = () if y is None else class_names(int(y.max()) + 1)
    return _split(source, x.astype(_level_dtype(levels)), y, levels, names)


def _digits() -> Images:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.reshape(-1, 8, 8, 1).astype(np.uint8)
    return _split("digits", x, digits.target.astype(np.int32), 17, DIGIT_WORDS)


def _split(name, x, y, levels: int, class_names: tuple[str, ...]) -> Images:
    from sklearn.model_selection import train_test_split

    if y is None:
        train, test = train_test_split(x, test_size=0.2, random_state=0)
        return Images(name, train, test, None, None, levels, class_names)
    train, test, train_y, test_y = train_test_split(x, y, test_size=0.2, random_state=0)
    return Images(name, train, test, train_y, test_y, levels, class_names)


def _load_npy(path: str, what: str) -> np.ndarray:
    if not pathlib.Path(path).is_file():
        raise ValueError(f"no {what} file at {path!r}; give the path of a .npy file")
    return np.load(path, allow_pickle=False)


def _check_images(x: np.ndarray, levels: int | None) -> int:
    """The number of gray levels of a user array, after checking it."""
    if x.ndim != 4:
        hint = "; a grayscale [N, H, W] array needs a trailing axis: x[..., None]" * (x.ndim == 3)
        raise ValueError(f"images have shape {x.shape}; expected [N, H, W, C]{hint}")
    if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        raise ValueError(
            f"images have shape {x.shape}: channels first, it seems; genjax reads "
            "[N, H, W, C]: np.moveaxis(x, 1, -1)"
        )
    if np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"images are {x.dtype}; convert them to integer levels, "
            "e.g. np.rint(x * 255).astype(np.uint8) for values in [0, 1]"
        )
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"images are {x.dtype}; expected uint8 or another integer type")
    if levels is None:
        if x.dtype != np.uint8:
            raise ValueError(
                f"{x.dtype} images need levels=K, their number of gray levels "
                "(values 0..K−1, e.g. levels=17 for values 0..16)"
            )
        levels = 256
    if levels < 2:
        raise ValueError(f"levels={levels}; an image needs at least 2 gray levels")
    if len(x) < 2:
        raise ValueError(f"{len(x)} image(s); a train/test split needs at least 2")
    low, high = int(x.min()), int(x.max())
    if low < 0:
        raise ValueError(f"image values go down to {low}; shift them to levels 0..{levels - 1}")
    if high >= levels:
        raise ValueError(
            f"image values reach {high}, outside 0..{levels - 1}; pass levels={high + 1}"
        )
    return levels


def _check_labels(y: np.ndarray, num_images: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != num_images:
        raise ValueError(f"labels have shape {y.shape}; expected [{num_images}], one per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels are {y.dtype}; expected integer class indices 0, 1, …")
    if y.min() < 0:
        raise ValueError(f"labels include {int(y.min())}; class indices must be non-negative")
    return y.astype(np.int32)


def class_names(num_classes: int) -> tuple[str, ...]:
    """The words "zero" … "nine" for up to ten classes (what text conditioning reads),
    else the indices written out."""
    if num_classes <= len(DIGIT_WORDS):
        return DIGIT_WORDS[:num_classes]
    return tuple(str(i) for i in range(num_classes))


def _level_dtype(levels: int) -> type:
    return np.uint8 if levels <= 256 else np.int32


def to_unit(x_int, levels: int):
    """Integer levels 0..L−1 to float32 in [−1, 1]: x / (L − 1) · 2 − 1 (numpy or jax, as given)."""
    return x_int.astype(np.float32) * _bin_width(levels) - np.float32(1)


def _bin_width(levels: int) -> np.float32:
    """The distance between neighbouring levels in [−1, 1]: one level's bin."""
    return np.float32(2 / (levels - 1))


def _spread_over_bin(x_unit, u, levels: int):
    """Each value moved to u ∈ [0, 1) across its level's bin (numpy or jax, as given)."""
    return x_unit + (u - np.float32(0.5)) * _bin_width(levels)


def to_levels(x_unit, levels: int):
    """The inverse of ``to_unit``, rounded and clipped to 0..L−1: samples on the data's scale."""
    x = ((x_unit + 1) * ((levels - 1) / 2)).round().clip(0, levels - 1)
    return x.astype(_level_dtype(levels))


def dequantize(x_int: jax.Array, levels: int, *, key: jax.Array) -> jax.Array:
    """Uniform dequantization around the points the model trains on: level k becomes
    ``to_unit(k) + (u − ½)·2/(L − 1)``, u ~ U[0, 1), filling the bin of width 2/(L − 1)
    centred on k's training value, so a density there bounds the discrete likelihood
    (Theis et al., 2016). Bins at 2k/L − 1 instead would sit off the training points
    (6% narrower at 17 levels, the top level at a bin's edge) and loosen the bound."""
    u = jax.random.uniform(key, jnp.shape(x_int))
    return _spread_over_bin(to_unit(jnp.asarray(x_int), levels), u, levels)


def bits_per_dim(nll_B, dims: int, levels: int):
    """Bits per dimension of the discrete images from the negative log-density
    (nats) of their ``dequantize``d values (coordinates z = 2y/(L − 1) − 1)."""
    # y = x + u − ½ fills [k − ½, k + ½) around level k and z = 2y/(L − 1) − 1, so
    # p_y(y) = p_z(z)·(2/(L − 1))^D and −log p_y = nll + D·log((L − 1)/2). By Jensen,
    # −log P(x) ≤ E_u[−log p_y(x + u − ½)]: over u this bounds the bits/dim from above.
    return (nll_B + dims * math.log((levels - 1) / 2)) / (dims * math.log(2))


def batches(
    images: Images, global_batch_size: int, *, seed: int, dequantize: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of shuffled, endlessly repeated training batches.

    Each batch is ``{"x": float32 [b, H, W, C] in [−1, 1], "label": int32 [b]}``
    ("label" only when the images are labelled), b = global_batch_size / processes;
    process i takes batches i, i + n, i + 2n, … of one global stream. With
    ``dequantize`` each value is spread uniformly over its level's bin, as
    ``dequantize`` does (fresh noise per batch, seeded by the batch's index). The
    iterator is grain's, so it checkpoints its position (get_state / set_state).
    """
    arrays = {"x": to_unit(images.train, images.levels)}
    if images.train_labels is not None:
        arrays["label"] = images.train_labels
    spread = functools.partial(_dequantize_batch, levels=images.levels) if dequantize else None
    return rows.row_batches(arrays, global_batch_size, seed=seed, transform=spread)


def _dequantize_batch(batch: dict, rng: np.random.Generator, *, levels: int) -> dict:
    u = rng.random(batch["x"].shape, np.float32)
    return {**batch, "x": _spread_over_bin(batch["x"], u, levels)}
