"""Layers and networks shared by the model families: dense projections, norms, RoPE,
attention; the denoisers (noise-conditioned MLP, U-Net, DiT) and their conditioning; a
VAE's encoders and decoders."""
