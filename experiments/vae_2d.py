"""A variational autoencoder of an exact 2-D mixture: the ring of 8 or the grid of 25 Gaussians.

Command (resumes when re-run with the same --workdir):

    python experiments/vae_2d.py --workdir runs/vae-ring
    python experiments/vae_2d.py --workdir runs/vae-grid --dataset grid

Hardware: a 2-core CPU, about 2.5 minutes. Expected on the ring (seed 0): 8/8 modes,
29.9% high quality, reverse KL 0.020: a VAE's samples carry its decoder's Gaussian noise,
so they spread around the modes (experiments/benchmarks/RESULTS.md). With no other
flags, 10,000 updates of 512 points (MLP encoder and decoder of two hidden layers of 128,
a 2-D latent, a Gaussian decoder with a learned standard deviation per coordinate, KL
warm-up over the first 3,000). Evaluation
draws 2,500 samples, z ~ N(0, I) then x ~ p(x|z), and scores them by the PacGAN protocol
next to a perfect sampler. The workdir then holds ``samples.npy`` (2,500 × 2),
``samples.png`` (the samples over the true density's contours) and ``eval.json``.

Local smoke run (seconds):

    python experiments/vae_2d.py --workdir /tmp/vae-ring --preset tiny

Any config field can be overridden with ``--set section.field=value`` (sections: model,
optim, data, run, sample; see genjax/vae.py and genjax/models/vae.py), e.g.
``--set model.beta=0.5 model.kl_warmup_steps=2000``.
"""

import sys

from genjax import run, vae


def main(argv=None) -> int:
    return run.main(vae.FAMILY, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
