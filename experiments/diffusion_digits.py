"""Class-conditional diffusion of scikit-learn's digits, with classifier-free guidance.

Command (resumes when re-run with the same --workdir):

    python experiments/diffusion_digits.py --workdir runs/digits

Hardware and time: a 2-core CPU, about 29 minutes (5,000 updates at about 3.7
per second, then 5 minutes of evaluation; experiments/benchmarks/RESULTS.md); with no
other flags a class-conditional U-Net (diffusers' UNet2DModel layout, 32/64
channels, attention at 4×4) is trained by denoising score matching with EDM
preconditioning on the 1,437 training digits, dequantized, one label in ten
dropped for guidance. Evaluation draws 1,000 samples from the EMA weights
(Heun, 32 levels, churn 30, guidance 0.8), 100 per class, and scores them in
the features of a classifier trained on the train split, next to real train
digits scored the same way; the test split's bits/dim comes from the
probability-flow ODE. The workdir then holds
``samples.npy`` (1,000 × 8 × 8 on the digits' 0–16 scale), ``samples.png``
(one row per class) and ``eval.json`` (every score, with its real-vs-real floor).

Variants: a DiT instead of the U-Net (``--set model.arch=dit``); conditioning
on the digit's name in words ("seven") through a small text encoder and
cross-attention (``--set model.condition=text``); your own images
(``--dataset PATH.npy --set data.labels=LABELS.npy``).

Local smoke run (seconds):

    python experiments/diffusion_digits.py --workdir /tmp/digits --preset tiny

More samples from a run: ``python -m genjax.sample --workdir DIR --guidance 3``.
"""

import sys

from genjax import diffuse, run


def main(argv=None) -> int:
    return run.main(diffuse.IMAGES, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
