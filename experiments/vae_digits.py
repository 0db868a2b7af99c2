"""A variational autoencoder of scikit-learn's digits, with a discretized logistic decoder.

Command (resumes when re-run with the same --workdir):

    python experiments/vae_digits.py --workdir runs/vae-digits

Hardware: a 2-core CPU (time and scores not yet measured). With no other flags, 1,500
updates of 128 digits (a convolutional encoder and decoder, a 16-D latent, a discretized
logistic over the 17 gray levels, KL warm-up over the first 1,000 updates). Evaluation
decodes 1,000 latents from the prior (the decoder's mean, rounded to the levels) and
scores them in the features of a classifier trained on the train split, next to real
train digits scored the same way; the test split's bits/dim is the importance-weighted
bound with 1,000 samples per digit. The workdir then holds ``samples.npy`` (1,000 × 8 ×
8 on the digits' 0–16 scale), ``samples.png``, ``interpolation.png`` (rows of decoded
points between the latents of two test digits) and ``eval.json``.

Local smoke run (seconds):

    python experiments/vae_digits.py --workdir /tmp/vae-digits --preset tiny

Your own images: ``--dataset IMAGES.npy`` (an [N, H, W, C] integer array; ``--set
data.levels=K`` for other than uint8).
"""

import sys

from genjax import run, vae


def main(argv=None) -> int:
    return run.main(vae.IMAGES, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
