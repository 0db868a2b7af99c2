"""A GAN of an exact 2-D mixture, the ring of 8 or the grid of 25 Gaussians: PacGAN's setup.

Command (resumes when re-run with the same --workdir):

    python experiments/gan_2d.py --workdir runs/gan-ring

Hardware: a 2-core CPU, about 9 minutes. Expected on the ring (seed 0): 8/8 modes, 98.0%
high quality, reverse KL 0.001. On the grid the discriminator also reads random Fourier
features of the points, R1 keeps it smooth, the latents are uniform, the learning rates
are tripled and fall linearly to 0 over the second half of the run (genjax/gan.py's
GRID_MODEL), and training takes 30,000 steps of 128 points in about the same time.
Seeds 0–4 get 25/25 modes each, 96.8% high quality on average and 96.5% the worst
(experiments/benchmarks/RESULTS.md):

    python experiments/gan_2d.py --workdir runs/gan-grid --dataset grid

With no other flags, PacGAN2 (Lin et al., 2018): its generator (4 × 400 ReLU) and maxout
discriminator (3 × 200, 5 pieces) on pairs of examples, the non-saturating loss, Adam
(lr 1e-4, β1 0.8), 10,000 steps of 512 points (the grid: above). Evaluation draws 2,500
samples of the generator's EMA and scores them by the PacGAN protocol next to a perfect
sampler. The workdir then holds ``samples.npy`` (2,500 × 2), ``samples.png`` and ``eval.json``.

Local smoke run (seconds):

    python experiments/gan_2d.py --workdir /tmp/gan-ring --preset tiny

Any config field can be overridden with ``--set section.field=value`` (sections: model,
data, run, sample; see genjax/gan.py and genjax/models/gan.py), e.g. a plain GAN:
``--set model.pack=1 model.fourier_features=0 model.r1_gamma=0`` (the last two only
matter on the grid, which also takes PacGAN's normal latents and constant rates back
with ``model.latent_distribution=normal model.lr_decay=0 model.g_lr=1e-4
model.d_lr=1e-4``).
"""

import sys

from genjax import gan, run


def main(argv=None) -> int:
    return run.main(gan.FAMILY, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
