"""Image data: the digits split, user arrays and their errors, level maps, bits/dim, batches."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from genjax.data import images


@pytest.fixture(scope="module")
def digits():
    return images.load("digits")


def test_digits_split_matches_sklearn_and_is_deterministic(digits):
    assert digits.train.shape == (1437, 8, 8, 1) and digits.test.shape == (360, 8, 8, 1)
    assert digits.train.dtype == np.uint8 and digits.train_labels.dtype == np.int32
    assert (digits.levels, digits.shape, digits.dims, digits.num_classes) == (17, (8, 8, 1), 64, 10)
    assert digits.class_names[0] == "zero" and digits.class_names[9] == "nine"
    assert digits.train.max() == 16
    raw = load_digits()
    train, test, train_y, test_y = train_test_split(
        raw.images, raw.target, test_size=0.2, random_state=0
    )
    np.testing.assert_array_equal(digits.train[..., 0], train)
    np.testing.assert_array_equal(digits.test[..., 0], test)
    np.testing.assert_array_equal(digits.train_labels, train_y)
    np.testing.assert_array_equal(digits.test_labels, test_y)
    again = images.load()
    np.testing.assert_array_equal(again.train, digits.train)


def test_labels_stay_with_their_images(digits):
    # Zeros are rings with an empty centre, ones a vertical stroke through it.
    mean = lambda c: digits.train[digits.train_labels == c].mean(axis=0)[..., 0]
    assert mean(0)[3:5, 3:5].mean() < 4 < mean(1)[3:5, 3:5].mean()
    assert np.abs(mean(0) - mean(1)).max() > 5


def test_to_unit_and_to_levels_round_trip():
    x = np.arange(17, dtype=np.uint8)
    unit = images.to_unit(x, 17)
    assert unit.dtype == np.float32 and unit[0] == -1 and unit[-1] == 1
    np.testing.assert_array_equal(images.to_levels(unit, 17), x)
    # Rounds to the nearest level and clips what falls outside [−1, 1].
    np.testing.assert_array_equal(
        images.to_levels(np.array([-3.0, 0.06, 0.07, 5.0]), 17), [0, 8, 9, 16]
    )
    photo = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(images.to_levels(images.to_unit(photo, 256), 256), photo)
    jax_out = images.to_levels(images.to_unit(jax.numpy.asarray(x), 17), 17)
    assert isinstance(jax_out, jax.Array)
    np.testing.assert_array_equal(jax_out, x)
    assert images.to_levels(np.zeros(2), 1000).dtype == np.int32


def test_samples_that_are_not_finite_are_refused_before_scoring():
    from genjax import generative

    samples = np.zeros((4, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(generative.quantized(samples + 0.01, 17), 0.0)
    samples[1, 2, 3], samples[3, 0, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match="2 of 4 samples hold NaN or inf"):
        generative.quantized(samples, 17)


def test_dequantize_stays_in_each_level_bin():
    x = np.repeat(np.arange(17, dtype=np.uint8), 200)
    z = np.asarray(images.dequantize(x, 17, key=jax.random.key(0)))
    # Level k's bin is centred on its training value, 1/16 either side of it.
    centre = images.to_unit(x, 17)
    assert np.all(np.abs(z - centre) <= 1 / 16 + 1e-6)
    # The offsets fill each bin, not one point of it.
    offset = (z - centre) * 8 + 0.5
    assert offset.min() < 0.05 and offset.max() > 0.95 and abs(offset.mean() - 0.5) < 0.03


def test_dequantize_on_a_sharded_batch_with_and_without_jit():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    x = jax.device_put(np.arange(16 * 64).reshape(16, 8, 8, 1) % 17, sharding)
    key = jax.random.key(1)
    eager = images.dequantize(x, 17, key=key)
    jitted = jax.jit(images.dequantize, static_argnums=1)(x, 17, key=key)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
    np.testing.assert_array_equal(np.floor((np.asarray(eager) + 1) * 8 + 0.5), x)


def test_bits_per_dim_of_the_uniform_density():
    # The L bins cover [−1 − 1/(L−1), 1 + 1/(L−1)]: uniform there, each dimension's
    # density is (L − 1)/(2L), so nll = D·log(2L/(L − 1)) — a uniform over the levels.
    dims = 64
    for levels in (2, 17, 256):
        nll = np.full(3, dims * math.log(2 * levels / (levels - 1)))
        np.testing.assert_allclose(images.bits_per_dim(nll, dims, levels), math.log2(levels))


def test_user_array_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 4, 5, 3), dtype=np.uint8)
    y = np.arange(20) % 3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    plain = images.load(str(tmp_path / "x.npy"))
    assert (plain.levels, plain.shape, len(plain.train), len(plain.test)) == (256, (4, 5, 3), 16, 4)
    assert plain.train_labels is None and plain.class_names == () and plain.num_classes == 0
    labelled = images.load(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))
    np.testing.assert_array_equal(labelled.train, plain.train)
    assert labelled.class_names == ("zero", "one", "two")
    # Each image keeps its own label through the split.
    index = [np.flatnonzero((x == image).all(axis=(1, 2, 3)))[0] for image in labelled.train]
    np.testing.assert_array_equal(labelled.train_labels, y[index])
    np.save(tmp_path / "many.npy", np.arange(20) % 12)
    many = images.load(str(tmp_path / "x.npy"), labels=str(tmp_path / "many.npy"))
    assert many.class_names[:2] == ("0", "1") and many.num_classes == 12
    np.save(tmp_path / "small.npy", (x % 17).astype(np.int64))
    small = images.load(str(tmp_path / "small.npy"), levels=17)
    assert small.levels == 17 and small.train.dtype == np.uint8


@pytest.mark.parametrize(
    ("array", "kwargs", "match"),
    [
        (None, {}, "no images file"),
        (np.zeros((5, 8, 8), np.uint8), {}, r"x\[\.\.\., None\]"),
        (np.zeros((5, 64), np.uint8), {}, r"expected \[N, H, W, C\]"),
        (np.zeros((5, 3, 8, 8), np.uint8), {}, r"channels first.*np.moveaxis\(x, 1, -1\)"),
        (np.zeros((5, 8, 8, 1), np.float32), {}, "convert them to integer levels"),
        (np.zeros((5, 8, 8, 1), np.int64), {}, "need levels=K"),
        (np.full((5, 8, 8, 1), -1, np.int64), {"levels": 17}, "shift them to levels 0..16"),
        (np.full((5, 8, 8, 1), 17, np.int64), {"levels": 17}, "pass levels=18"),
        (np.zeros((1, 8, 8, 1), np.uint8), {}, "at least 2"),
        (np.zeros((5, 8, 8, 1), np.uint8), {"labels": "missing.npy"}, "no labels file"),
        (np.zeros((5, 8, 8, 1), np.uint8), {"labels": np.zeros(4, int)}, r"expected \[5\]"),
        (np.zeros((5, 8, 8, 1), np.uint8), {"labels": np.zeros((5, 1), int)}, r"expected \[5\]"),
        (np.zeros((5, 8, 8, 1), np.uint8), {"labels": np.zeros(5)}, "integer class indices"),
        (np.zeros((5, 8, 8, 1), np.uint8), {"labels": -np.ones(5, int)}, "non-negative"),
    ],
)
def test_bad_user_input_names_the_fix(tmp_path, array, kwargs, match):
    path = tmp_path / "x.npy"
    if array is not None:
        np.save(path, array)
    if isinstance(kwargs.get("labels"), np.ndarray):
        np.save(tmp_path / "y.npy", kwargs["labels"])
        kwargs = {**kwargs, "labels": str(tmp_path / "y.npy")}
    elif "labels" in kwargs:
        kwargs = {**kwargs, "labels": str(tmp_path / kwargs["labels"])}
    with pytest.raises(ValueError, match=match):
        images.load(str(path), **kwargs)


def test_unknown_source_and_digits_options():
    with pytest.raises(ValueError, match="use 'digits' or a path"):
        images.load("mnist")
    with pytest.raises(ValueError, match="pass neither"):
        images.load("digits", levels=256)


def test_batches_shapes_dtypes_and_ranges(digits):
    batch = next(images.batches(digits, 32, seed=0))
    assert batch["x"].shape == (32, 8, 8, 1) and batch["x"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["x"].min() == -1 and batch["x"].max() == 1
    # Every value is one of the 17 levels' positions.
    np.testing.assert_allclose(batch["x"] * 8 + 8, np.rint(batch["x"] * 8 + 8), atol=1e-5)
    unlabelled = dataclasses.replace(digits, train_labels=None, test_labels=None)
    assert set(next(images.batches(unlabelled, 4, seed=0))) == {"x"}
    for bad in (0, 1438):
        with pytest.raises(ValueError, match="number of training examples"):
            images.batches(digits, bad, seed=0)


def _numbered(n: int) -> images.Images:
    """n distinct 2×2 images whose pixels spell their index in base 17."""
    digits_N4 = (np.arange(n)[:, None] // 17 ** np.arange(4)) % 17
    x = digits_N4.reshape(n, 2, 2, 1).astype(np.uint8)
    labels = np.arange(n, dtype=np.int32)
    return images.Images("numbered", x, x[:2], labels, labels[:2], 17, ())


def test_each_epoch_is_a_fresh_permutation():
    # 10 does not divide 97, so batches straddle the epoch boundary.
    data = _numbered(97)
    iterator = images.batches(data, 10, seed=3)
    stream = np.concatenate([next(iterator)["label"] for _ in range(20)])
    first, second = stream[:97], stream[97:194]
    np.testing.assert_array_equal(np.sort(first), np.arange(97))
    np.testing.assert_array_equal(np.sort(second), np.arange(97))
    assert not np.array_equal(first, second)
    # Labels stay with their images through the shuffle.
    batch = next(images.batches(data, 10, seed=3))
    np.testing.assert_array_equal(images.to_levels(batch["x"], 17), data.train[batch["label"]])


def test_dequantized_batches_fill_each_level_bin_with_fresh_noise():
    data = _numbered(97)
    plain = images.batches(data, 10, seed=3)
    noisy = images.batches(data, 10, seed=3, dequantize=True)
    noises = []
    for _ in range(12):  # past the epoch's end: the same images come back with new noise
        a, b = next(plain), next(noisy)
        np.testing.assert_array_equal(a["label"], b["label"])
        noises.append(b["x"] - a["x"])
        # Level k of 17 stays in its bin [k − ½, k + ½) of width 2/16 around to_unit(k).
        assert np.abs(noises[-1]).max() <= 1 / 16 + 1e-6
        np.testing.assert_array_equal(images.to_levels(b["x"], 17), data.train[b["label"]])
    noise = np.concatenate(noises).ravel()
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - (2 / 16) / math.sqrt(12)) < 0.003
    assert not np.allclose(noises[0], noises[10])


@pytest.mark.parametrize("dequantize", [False, True])
def test_resume_from_state_continues_identically(digits, dequantize):
    iterator = images.batches(digits, 64, seed=1, dequantize=dequantize)
    for _ in range(30):  # past the first epoch's end (1437 / 64 ≈ 22.5 batches)
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = images.batches(digits, 64, seed=1, dequantize=dequantize)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_class_grid_names_each_row_whole_beside_its_digits(digits):
    from genjax import generative

    labels = np.resize(np.arange(10), 100)
    samples = digits.train[:100]
    fig = generative.image_grid(samples, digits, {"frechet_distance": 1.0}, labels)
    renderer = fig.canvas.get_renderer()
    rows = np.asarray(fig.axes).reshape(10, 10)
    names = [t for ax in rows[:, 0] for t in ax.texts]
    assert [t.get_text() for t in names] == list(digits.class_names)
    for name, row in zip(names, rows, strict=True):
        box = name.get_window_extent(renderer)
        first = row[0].get_window_extent(renderer)
        assert box.x1 < first.x0  # in the margin, not on a digit
        assert first.y0 < (box.y0 + box.y1) / 2 < first.y1  # level with its row
    generative.pyplot().close(fig)
