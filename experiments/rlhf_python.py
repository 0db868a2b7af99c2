"""RLHF on the standard-library language model, with a programmatic gold reward: does the
completed function parse?

    python experiments/rlhf_python.py --workdir runs/rlhf_python --base runs/lm [--quick]

``--base`` is the main job's run (``experiments/lm_pretrain.py``). Stages, each a run of
the shared run layer in its own workdir (re-running resumes):

    DIR/sft   fine-tune the base on (signature + docstring → body) pairs of the standard
              library's documented functions (``genjax.rl.python_task``)
    DIR/rm    a reward model on preference pairs labelled by the gold reward: a body that
              parses (chosen) against the same body cut short where that does not parse
    DIR/ppo   PPO against the reward model, KL penalty to the SFT model, on prompts whose
              reference body fits the response length
    DIR/ppo_gold  the same PPO against the gold reward itself (``parses``, a Python
              function of the texts), to tell the reward model's errors from PPO's

Then the SFT model and both PPO policies each answer the held-out prompts (temperature 1)
and are scored: parse rate (the gold reward), proxy reward, KL to the SFT model. Writes
``DIR/results.json``: {"sft", "ppo", "ppo_gold": {"parse_rate", "proxy_reward", "kl"},
"reward_model": {"val_accuracy"}}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from genjax import lm, reward_model, rlhf, run, sft
from genjax.rl import data as rldata
from genjax.rl import python_task

# Prompt tokens (with the leading <eod>) and response tokens: 64 each, or half the
# base model's context when that is shorter.
LENGTH = 64


def write_data(d: pathlib.Path, tok, length: int) -> dict[str, pathlib.Path]:
    """pairs.jsonl, preferences.jsonl, prompts.jsonl (training prompts that fit) and
    eval_prompts.jsonl (held-out prompts that fit), written once."""
    paths = {name: d / "data" / f"{name}.jsonl"
             for name in ("pairs", "preferences", "prompts", "eval_prompts")}  # fmt: skip
    if all(p.exists() for p in paths.values()):
        return paths
    train_files, _ = lm.corpus_split(lm.DataConfig())
    pairs = python_task.function_pairs(train_files)
    train_pairs, val_pairs = rldata.split(pairs, 0.1)

    def fits(p) -> bool:
        return len(tok.encode(p["prompt"])) < length and len(tok.encode(p["response"])) < length

    records = {
        "pairs": pairs,
        "preferences": python_task.preference_pairs(pairs),
        "prompts": [{"prompt": p["prompt"]} for p in train_pairs if fits(p)],
        "eval_prompts": [{"prompt": p["prompt"]} for p in val_pairs if fits(p)][:128],
    }
    paths["pairs"].parent.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows):,} records to {paths[name]}")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--base", required=True, help="the pre-trained LM run (its workdir)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps per stage")
    args = p.parse_args(argv)
    d = pathlib.Path(args.workdir)
    steps = (dict(sft=4, rm=4, ppo=2, ppo_gold=2) if args.quick
             else dict(sft=300, rm=200, ppo=100, ppo_gold=100))  # fmt: skip
    try:
        base_model = sft.base_model(args.base)
        length = min(LENGTH, base_model.max_seq_len // 2)
        paths = write_data(d, sft.base_tokenizer(args.base, base_model), length)
        rows = [f"data.seq_len={2 * length}", "data.global_batch_size=16", "optim.lr=3e-4"]
        stages = {
            "sft": (sft.FAMILY, [f"base={args.base}", f"data.path={paths['pairs']}", *rows]),
            "rm": (reward_model.FAMILY, [f"base={d / 'sft'}", f"data.path={paths['preferences']}",
                                         *rows]),
        }  # fmt: skip
        # PPO against the reward model, and against the gold reward itself.
        for name, reward in (("ppo", d / "rm"), ("ppo_gold", "genjax.rl.python_task:parses")):
            stages[name] = (rlhf.FAMILY, [
                f"base={d / 'sft'}", f"data.path={paths['prompts']}", f"rl.reward={reward}",
                f"data.prompt_len={length}", f"rl.max_new_tokens={length}",
                "rl.prompts_per_update=16", "rl.minibatches=2", "rl.epochs=2",
                "optim.lr=3e-5", "run.log_every=5",
            ])  # fmt: skip
        for name, (family, assignments) in stages.items():
            n = steps[name]
            cadence = [f"run.steps={n}", f"run.checkpoint_every={n}"]
            if family is not rlhf.FAMILY:
                cadence.append(f"run.eval_every={n}")
            print(f"== {family.name}: {d / name}", flush=True)
            cfg = run.configure(family, "default", [*assignments, *cadence])
            run.train(cfg, d / name, family)
        model = sft.base_model(d / "sft")
        tok = sft.base_tokenizer(d / "sft", model)
        reference = sft.load_base(d / "sft")
        prompts = [r["prompt"] for r in rldata.read_jsonl(paths["eval_prompts"], ("prompt",))]
        policies = {"sft": reference}
        for method in ("ppo", "ppo_gold"):
            policies[method] = rlhf.load_policy(d / method)[1]
        results = {}
        for method, params in policies.items():
            scores, _ = rlhf.evaluate_policy(
                model, params, reference, tok, prompts, gold=python_task.parses,
                reward_model_dir=d / "rm", max_new_tokens=length, prompt_len=length,
            )  # fmt: skip
            results[method] = {"parse_rate": scores.pop("gold_reward"), **scores}
    except run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logged = [json.loads(line) for line in (d / "rm" / "metrics.jsonl").read_text().splitlines()]
    results["reward_model"] = {"val_accuracy": [r for r in logged if "val_accuracy" in r][-1]
                               ["val_accuracy"]}  # fmt: skip
    results["eval_prompts"] = len(prompts)
    (d / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for method in policies:
        r = results[method]
        print(f"{method}: parse rate {r['parse_rate']:.3f}, proxy reward {r['proxy_reward']:.3f}, "
              f"KL to SFT {r['kl']:.3f}, {r['response_tokens']:.1f} tokens per response "
              f"({len(prompts)} prompts)")  # fmt: skip
    print(f"wrote {d / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
