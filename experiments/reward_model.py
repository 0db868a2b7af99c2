"""Train a reward model on preference pairs, starting from a language-model run.

Command (resumes when re-run with the same --workdir):

    python experiments/reward_model.py --workdir runs/rm --base runs/sft --data prefs.jsonl

``--base`` is an LM run (pre-trained or fine-tuned): its weights start the trunk, a
scalar head reads the final features at the response's closing ``<eod>``. ``--data`` is
JSON lines ``{"prompt", "chosen", "rejected"}``; 10% of the pairs (by a hash of the
prompt) are held out. Loss: Bradley–Terry, ``--set margin=M`` for a margin. Reports the
held-out pairwise accuracy and writes ``WORKDIR/normalization.json`` (the training
rewards' mean and std, which RL runs divide out). Sections for ``--set``: optim, data,
run (the model is the base's).
"""

import sys

from genjax import reward_model, run

if __name__ == "__main__":
    sys.exit(run.main(reward_model.FAMILY, description=__doc__.split("\n\n")[0]))
