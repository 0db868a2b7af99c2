"""A variational autoencoder of scikit-learn's digits, with a discretized logistic decoder.

Command (resumes when re-run with the same --workdir):

    python experiments/vae_digits.py --workdir runs/vae-digits

Hardware: a 2-core CPU, about 6 minutes (seed 0, the cores shared with another run).
Expected: test bits/dim about 1.93 (seed 0: 1.928; scikit-learn's GaussianMixture
2.82, KernelDensity 3.28), Fréchet distance about 3× the real-vs-real floor's (seed 0:
25.3 against 8.98). With no other flags, 1,500
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
