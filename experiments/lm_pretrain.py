"""Pre-train a Llama-style language model on Python source.

Command (the README's main job; resumes when re-run with the same --workdir):

    python experiments/lm_pretrain.py --workdir runs/lm

Hardware and time: with no flags but --workdir it trains the ``cpu-small``
preset (12.2M parameters, the configuration of experiments/benchmarks/README.md)
on the Python standard library of this machine for 400 steps of 16 × 256
tokens — about 11–28 minutes on a 2-core CPU — then prints validation bits per
byte and two short samples (greedy, and at temperature 0.8 with top-p 0.95).
Expected: about 1.75 validation bits/byte (measured numbers in
experiments/benchmarks/RESULTS.md).

Local smoke run (the ``tiny`` preset: rows of its 64-token context):

    python experiments/lm_pretrain.py --workdir /tmp/lm --preset tiny --steps 20

Any config field can be overridden with ``--set section.field=value``
(sections: model, optim, data, run, sample; see genjax/lm.py for every field).
"""

import sys

from genjax import lm, run


def main(argv=None) -> int:
    return run.main(lm.FAMILY, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
