"""Test setup: 8 fake CPU devices, set before JAX initializes."""

import importlib.util
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    on_accelerator = jax.default_backend() != "cpu"
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "accelerator" in item.keywords and not on_accelerator:
            item.add_marker(skip)


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """Imports a script of the repository (a path from its root) as a module."""

    def load(relative_path: str):
        path = ROOT / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def stdlib_lm(tmp_path_factory):
    """A tiny LM trained a few steps on two stdlib packages: (its workdir, its corpus)."""
    import shutil
    import sysconfig

    from genjax import lm, run

    root = tmp_path_factory.mktemp("base")
    corpus = root / "corpus"
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "html"):
        shutil.copytree(stdlib / name, corpus / name, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = run.configure(lm.FAMILY, "tiny", [
        f"data.corpus=('{corpus}',)", "data.seq_len=32", "data.global_batch_size=8",
        "data.val_fraction=0", "model.vocab_size=384", "model.max_seq_len=256", "run.steps=2",
        "sample.tokens=0",
    ])  # fmt: skip
    run.train(cfg, root / "lm", lm.FAMILY)
    return root / "lm", corpus


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory, load_script):
    """The digits diffusion experiment at its tiny preset, trained the way the quality
    benchmark trains its seeds (``experiments/diffusion_digits.py`` in a subprocess): its
    workdir, ``.../seed-0``."""
    quality = load_script("experiments/benchmarks/diffusion_digits_quality.py")
    (workdir,) = quality.train_runs(1, tmp_path_factory.mktemp("digits"), "tiny")
    return workdir
