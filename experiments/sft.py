"""Supervised fine-tuning of a trained language model on prompt–response pairs.

Command (resumes when re-run with the same --workdir):

    python experiments/sft.py --workdir runs/sft --base runs/lm
    python experiments/sft.py --workdir runs/sft --base runs/lm --data pairs.jsonl

``--base`` is an LM run (``experiments/lm_pretrain.py``'s workdir, or one imported from
Hugging Face): its newest weights, model config and tokenizer. ``--data`` is JSON lines
``{"prompt": ..., "response": ...}``; without it the script writes
``WORKDIR/pairs.jsonl`` from the Python standard library: for every documented function
(at most 12 lines of signature and docstring, 1–16 lines of body), the prompt is its
``def`` line and docstring, the response its body. The loss counts the response tokens
and the closing end-of-document only; 10% of the pairs (by a hash of the prompt) are
held out: the run reports their loss per response token and prints greedy answers to two
of them. Hardware: a 2-core CPU, cpu-small base, 200 updates of 16 rows of 128 tokens:
a few minutes.

Local smoke run: ``--preset tiny``. Any field by ``--set section.field=value``
(sections: optim, data, run; the model is the base's).
"""

from __future__ import annotations

import pathlib
import sys

from genjax import lm, run, sft
from genjax.rl import data as rldata
from genjax.rl import python_task


def write_default_pairs(workdir: pathlib.Path) -> pathlib.Path:
    """WORKDIR/pairs.jsonl from the standard library's training modules (written once)."""
    path = workdir / "pairs.jsonl"
    if not path.exists():
        train_files, _ = lm.corpus_split(lm.DataConfig())
        pairs = python_task.function_pairs(train_files)
        rldata.write_jsonl(path, pairs)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data" not in argv and "--workdir" in argv:
        workdir = pathlib.Path(argv[argv.index("--workdir") + 1])
        argv += ["--data", str(write_default_pairs(workdir))]
    return run.main(sft.FAMILY, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
