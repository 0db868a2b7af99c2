"""A trained run against Hugging Face: tokenizer ids, greedy decoding, nucleus sizes.

The tests compare genjax with transformers on random weights; this checks a real run
the way a user would use it. The run's newest checkpoint is exported
(`genjax.interop.hf.export_run`) to a temporary folder, which
`transformers.AutoTokenizer` and `LlamaForCausalLM` load; then, for a few Python
prompts:

- tokenizer: transformers' ids of each prompt equal genjax's (`<eod>` first);
- greedy: one genjax batch of all prompts (left-padded, of different lengths) gives
  the same new tokens as transformers' greedy `generate` of each prompt alone;
- nucleus: the number of tokens top-p keeps (`--top-p`) along genjax's greedy
  continuations, from its logits: how large the truncated distributions of a
  trained model are (a top-p shortcut that looked only among the most likely
  tokens would need them small).

    python experiments/lm_pretrain.py --workdir runs/lm      # the README's main job
    python experiments/benchmarks/trained_run_parity.py --workdir runs/lm \\
        --results experiments/benchmarks/RESULTS.md

Under a minute on a 2-core CPU for cpu-small. Needs torch (the `bench` extra) and
transformers (the `test` extra). Protocol: experiments/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile

import numpy as np

from genjax.benchmarking import report

TITLE = "LM decoding: a trained run against transformers"

PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n",
    "    for i in range(len(items)):\n        if ",
)


def nucleus_sizes(logits_NV: np.ndarray, top_p: float) -> np.ndarray:
    """Per row, how many of the most likely tokens it takes for their probability
    to reach ``top_p`` (what top-p sampling keeps)."""
    z = logits_NV - logits_NV.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    V = probs.shape[-1]
    if top_p >= 1.0:  # everything, even where float32 sums reach 1 early
        return np.full(probs.shape[:-1], V)
    cumulative = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    return np.minimum((cumulative < top_p).sum(-1) + 1, V)


def check(workdir: str, new_tokens: int, top_p: float) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from genjax import lm
    from genjax.interop import hf
    from genjax.sampling import decode

    loaded = lm.load(workdir)
    cfg, params, tok, step = loaded.cfg.model, loaded.params, loaded.tokenizer, loaded.step
    ids = [[tok.eos_id, *tok.encode(p)] for p in PROMPTS]
    gen = decode.generate(
        cfg, params, ids, max_new_tokens=new_tokens, eos_id=tok.eos_id, return_logits=True
    )
    with tempfile.TemporaryDirectory() as out:
        hf.export_run(workdir, out)
        hf_tok = AutoTokenizer.from_pretrained(out)
        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        rows = []
        for prompt, prompt_ids, ours, why in zip(
            PROMPTS, ids, gen.tokens, gen.finish_reasons, strict=True
        ):
            with torch.inference_mode():
                out_ids = model.generate(
                    torch.tensor([prompt_ids]),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=tok.eos_id,
                    pad_token_id=tok.eos_id,
                )
            theirs = out_ids[0, len(prompt_ids) :].tolist()
            # Both stop at end-of-document; genjax leaves it out of its tokens, HF keeps it.
            same = theirs == ours + ([tok.eos_id] if why == "eos" else [])
            rows.append(
                {
                    "prompt": prompt,
                    "tokens": len(prompt_ids),
                    "tokenizer_equal": hf_tok(prompt)["input_ids"] == prompt_ids,
                    "greedy_equal": same,
                    "new": len(ours),
                }
            )
    sizes = np.concatenate(
        [nucleus_sizes(gen.logits[r, : len(t)], top_p) for r, t in enumerate(gen.tokens)]
    )
    return {"step": step, "cfg": cfg, "rows": rows, "sizes": sizes}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a genjax language-model run")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass for the sizes")
    p.add_argument("--results", type=pathlib.Path, help="append a dated section to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.new_tokens < 1 or not 0 < args.top_p <= 1:
        raise SystemExit("--new-tokens must be >= 1 and --top-p in (0, 1]")
    import jax
    import torch
    import transformers

    try:
        result = check(args.workdir, args.new_tokens, args.top_p)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    rows, sizes = result["rows"], result["sizes"]
    lines = [
        "| prompt | prompt tokens | tokenizer ids equal | greedy tokens equal | new tokens |",
        "|---|---|---|---|---|",
        *(
            f"| `{r['prompt']!r}` | {r['tokens']} | {r['tokenizer_equal']} "
            f"| {r['greedy_equal']} | {r['new']} |"
            for r in rows
        ),
        "",
        f"Nucleus at top-p {args.top_p} over {sizes.size} greedy positions: median "
        f"{np.median(sizes):.0f} tokens, 90th percentile {np.percentile(sizes, 90):.0f}, "
        f"{(sizes <= 32).mean():.0%} of positions within the 32 most likely tokens "
        f"(vocabulary {result['cfg'].vocab_size}).",
    ]
    header = [
        f"run {args.workdir} at step {result['step']}, {args.new_tokens} greedy tokens per "
        "prompt; genjax: one batch of all prompts (`decode.generate`); transformers: "
        "`LlamaForCausalLM.generate(do_sample=False)` of each prompt alone, float32"
    ]
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    report(TITLE, __file__, argv, versions, header, lines, args.results)
    ok = all(r["tokenizer_equal"] and r["greedy_equal"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
