"""RL fine-tuning of a language model against a reward: PPO with a KL penalty, or GRPO.

Command (resumes when re-run with the same --workdir, with the same rollouts):

    python experiments/rlhf.py --workdir runs/ppo --base runs/sft --data prompts.jsonl \
        --reward runs/rm
    python experiments/rlhf.py ... --reward mypackage.rewards:score --set rl.algorithm=grpo \
        rl.group_size=4

``--base`` is the LM run trained (and, unless ``rl.reference`` names another run, the
frozen reference of the KL penalty). ``--data`` is JSON lines ``{"prompt"}``.
``--reward`` is a reward model run (``experiments/reward_model.py``) or a Python
function ``module:function`` taking lists of prompts and responses and returning a
float per response. Each update samples ``rl.prompts_per_update`` × ``rl.group_size``
responses with the KV-cache decoder, scores them, and makes ``rl.epochs`` passes of
``rl.minibatches`` clipped updates; ``metrics.jsonl`` logs score, KL, β, clip fractions,
approximate KL, value error, entropy, response length and the truncated share. Fields
(``--set rl.field=value``): ``genjax/rlhf.py``'s ``RLConfig``; ``optim.eps_style=
tensorflow`` for TensorFlow's Adam epsilon.
"""

import sys

from genjax import rlhf, run

if __name__ == "__main__":
    sys.exit(run.main(rlhf.FAMILY, description=__doc__.split("\n\n")[0]))
