"""Driving a family's own pieces without ``run.train``: the sharded-equals-one-device
tests of every family share this."""

import jax
import numpy as np

from genjax import mesh as meshlib
from genjax import run, train


def train_by_hand(family: run.Family, cfg, mesh, steps: int, losses=("loss",)):
    """(the step's ``losses`` metrics [steps, len(losses)], final state) of ``steps``
    updates of ``family`` on ``mesh``, from seed 0, on the family's own batches."""
    _, shardings = run.abstract_state(cfg, family, mesh)
    state = train.create_state(lambda k: family.init(cfg, k), shardings, mesh, jax.random.key(0))
    step = train.jit_train_step(family.step(cfg), shardings, mesh)
    batches = family.data(cfg, None).batches
    values = []
    for _ in range(steps):
        state, metrics = step(state, meshlib.global_batch(next(batches), mesh))
        values.append([float(metrics[name]) for name in losses])
    return np.array(values), state
