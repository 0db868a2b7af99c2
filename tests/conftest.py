"""Test setup, before JAX initializes: 8 fake CPU devices, and one compilation cache
for the session."""

import importlib.util
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile the same tiny programs many times: every run builds its own jitted step,
# and subprocesses (killed runs, two-process runs) start cold. JAX's persistent cache
# serves a program compiled once to every later test and subprocess (they inherit the
# environment). Its key is the program with debug info stripped, so a changed program
# compiles anew. Fresh for each session, so nothing carries over between runs. Entries
# from 0.1 s of compiling (JAX's default is 1 s): most of these programs take less.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="genjax-tests-jax-cache-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"

import jax
import pytest


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
