"""Test setup: 8 fake CPU devices, set before JAX initializes."""

import os

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
