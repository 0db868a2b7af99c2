"""Language-model decoding: token ids (``decode``) and text (``text``)."""

from genjax.sampling.decode import Decoder, Generation, SamplingParams, generate
from genjax.sampling.text import generate_text

__all__ = ["Decoder", "Generation", "SamplingParams", "generate", "generate_text"]
