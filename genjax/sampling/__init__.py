"""Language-model decoding: token ids (``decode``) and text (``text``)."""

from genjax.sampling.decode import Generation, SamplingParams, generate
from genjax.sampling.text import generate_text

__all__ = ["Generation", "SamplingParams", "generate", "generate_text"]
