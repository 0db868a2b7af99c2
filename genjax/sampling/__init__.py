"""Sampling: language-model decoding (``decode``, ``text``); diffusion samplers (``diffusion``)."""

from genjax.sampling.decode import Decoder, Generation, SamplingParams, generate
from genjax.sampling.text import generate_text

__all__ = ["Decoder", "Generation", "SamplingParams", "generate", "generate_text"]
