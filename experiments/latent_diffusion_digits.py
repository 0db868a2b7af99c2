"""Latent diffusion of scikit-learn's digits: diffusion in the latent space of a trained VAE.

Command (resumes when re-run with the same --workdir):

    python experiments/latent_diffusion_digits.py --workdir runs/latent-digits
    python experiments/latent_diffusion_digits.py --workdir runs/latent-digits \
        --vae-workdir runs/vae-digits

Without --vae-workdir the VAE of ``experiments/vae_digits.py`` (same preset and seed) is
trained first in WORKDIR/vae, unless a finished one is there. Then the training digits
are encoded once; each batch draws z ~ q(z|x) of its digits, scaled to unit variance,
and a class-conditional MLP denoiser learns them by EDM's denoising score matching.
Evaluation draws 1,000 latents (Heun, 32 noise levels, classes 0, 1, …, 9, 0, …),
decodes them with the VAE and scores them in the features of a classifier trained on
the train split, next to real train digits scored the same way. The workdir then holds
``samples.npy`` (1,000 × 8 × 8 on the digits' 0–16 scale), ``samples.png`` and
``eval.json``. A VAE of another latent size than the run was made for is refused.

Hardware: a 2-core CPU, 14 minutes with the VAE (seed 0, the cores shared with another
run: the VAE 6, the latent model 7 and its evaluation). Expected: Fréchet distance near
the real-vs-real floor's, 10/10 classes (seed 0: 9.92 against 8.98, conditional
accuracy 0.995; experiments/benchmarks/RESULTS.md).

Local smoke run (seconds):

    python experiments/latent_diffusion_digits.py --workdir /tmp/latent-digits --preset tiny

Any config field can be overridden with ``--set section.field=value`` (sections: model,
process, optim, data, run, sample, latent; see genjax/latent_diffusion.py and
genjax/diffuse.py), e.g. ``--set sample.guidance=2``.
"""

import sys

from genjax import latent_diffusion


def main(argv=None) -> int:
    return latent_diffusion.main(argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
