"""A class-conditional GAN of scikit-learn's digits: hinge loss, spectral norm, projection D.

Command (resumes when re-run with the same --workdir):

    python experiments/gan_digits.py --workdir runs/gan-digits

Hardware: a 2-core CPU, about 10 minutes with the cores shared by two runs. Expected
(seeds 0–4): Fréchet distance 1.21× the real-vs-real floor's on average, 1.36× at worst,
10/10 classes, precision 0.88 and recall 0.83 against the floor's 0.92 and 0.91
(experiments/benchmarks/RESULTS.md). With no other flags, 2,000 updates of 128 digits: a
convolutional generator conditioned on the class (a label embedding joined to z) against
a spectrally normalized convolutional discriminator with a class projection (Miyato &
Koyama, 2018), two discriminator steps per generator step, hinge loss, Adam (β1 0,
β2 0.9), an EMA of the generator (0.995). Evaluation draws
1,000 samples of the generator's EMA, 100 per class, and scores them in the features of
a classifier trained on the train split, next to real train digits scored the same way.
The workdir then holds ``samples.npy`` (1,000 × 8 × 8 on the digits' 0–16 scale),
``samples.png`` (one row per class) and ``eval.json``.

Local smoke run (seconds):

    python experiments/gan_digits.py --workdir /tmp/gan-digits --preset tiny
"""

import sys

from genjax import gan, run


def main(argv=None) -> int:
    return run.main(gan.IMAGES, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
