import jax
import jax.numpy as jnp
import numpy as np

from genjax import sampling
from genjax.models import transformer

CFG = transformer.get_preset("tiny")


def test_greedy_equals_argmax_loop_over_full_forwards():
    params = transformer.init(CFG, jax.random.key(0))
    prompt, num_new = [2, 5, 7, 9], 12
    buffer = np.full((1, CFG.max_seq_len), 2, np.int32)
    buffer[0, : len(prompt)] = prompt
    out = sampling.greedy(CFG, params, jnp.asarray(buffer), jnp.int32(len(prompt)), num_new)
    seq = list(prompt)
    for _ in range(num_new):
        logits = transformer.forward(CFG, params, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert np.asarray(out)[0, : len(seq)].tolist() == seq
    # Positions after the generated span are untouched.
    assert (np.asarray(out)[0, len(seq) :] == 2).all()
