"""Layers shared by the model families: dense projections, norms, RoPE, attention."""
