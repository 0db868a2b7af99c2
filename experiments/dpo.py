"""Direct preference optimization of a language model on preference pairs.

Command (resumes when re-run with the same --workdir):

    python experiments/dpo.py --workdir runs/dpo --base runs/sft --data prefs.jsonl

``--base`` is the LM run trained, and the frozen reference. ``--data`` is JSON lines
``{"prompt", "chosen", "rejected"}`` (the reward model's format). ``--set beta=B`` sets
DPO's β (0.1). Reports the held-out accuracy of the implicit reward β (log π − log
π_ref). Sections for ``--set``: optim, data, run.
"""

import sys

from genjax import dpo, run

if __name__ == "__main__":
    sys.exit(run.main(dpo.FAMILY, description=__doc__.split("\n\n")[0]))
