"""Language-model decoding."""

from genjax.sampling.lm import greedy, greedy_sample

__all__ = ["greedy", "greedy_sample"]
