"""Score-based diffusion on an exact 2-D mixture: the ring of 8 or the grid of 25 Gaussians.

Command (resumes when re-run with the same --workdir):

    python experiments/diffusion_2d.py --workdir runs/ring
    python experiments/diffusion_2d.py --workdir runs/grid --dataset grid

Hardware and time: a 2-core CPU, about 5 minutes for the ring and 8 for the grid;
with no other flags, 16,000 updates of 512 points (24,000 for the grid's 25 modes;
a 5-layer MLP of width 256, EDM preconditioning) and an evaluation of 2,500 samples
from the EMA weights by 128 Heun steps. The workdir then holds
``samples.npy`` (2,500 × 2), ``samples.png`` (the samples over the true
density's contours) and ``eval.json`` (modes captured, % high quality, reverse
KL by the PacGAN protocol, next to a perfect sampler's). Measured numbers:
experiments/benchmarks/RESULTS.md.

Local smoke run (seconds):

    python experiments/diffusion_2d.py --workdir /tmp/ring --preset tiny

Any config field can be overridden with ``--set section.field=value``
(sections: model, process, optim, data, run, sample; see genjax/diffuse.py and
genjax/models/diffusion.py), e.g. ``--set process.sde=vp process.parameterization=eps``.
"""

import sys

from genjax import diffuse, run


def main(argv=None) -> int:
    return run.main(diffuse.FAMILY, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
