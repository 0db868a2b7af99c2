"""RLHF on the standard-library language model, with a programmatic gold reward: does the
completed function parse, with a body that is no stub?

    python experiments/rlhf_python.py --workdir runs/rlhf_python --base runs/lm [--seeds 3]
        [--quick]

``--base`` is the main job's run (``experiments/lm_pretrain.py``). Stages, each a run of
the shared run layer in its own workdir (re-running resumes):

    DIR/sft   fine-tune the base on (signature + docstring → body) pairs of the standard
              library's documented functions (``genjax.rl.python_task``)
    DIR/data/preferences.jsonl
              the SFT model answers each prompt 4 times (temperature 1), the training
              prompts and the held-out ones; the gold reward labels the answers: one it
              rejects against one it accepts (or against the reference body, when it
              accepts none); pairs of held-out prompts measure the reward model
    DIR/rm    a reward model on those preference pairs
    DIR/seed<k>/ppo       PPO against the reward model, KL penalty to the SFT model, on
              prompts whose reference body fits the response length
    DIR/seed<k>/ppo_gold  the same PPO against the gold reward itself (``writes_a_body``,
              a Python function of the texts), to tell the reward model's errors from PPO's
    DIR/seed<k>/dpo       DPO on the preference pairs, the SFT model its reference
    DIR/seed<k>/grpo      GRPO against the reward model: groups of 4 answers to a prompt,
              half as many updates of twice the answers (PPO's number of answers)

The gold reward is 1 where the completed function parses and its body is no stub (a
statement besides the docstring, ``pass``, ``...`` and ``raise NotImplementedError``): a
signature and docstring parse already. For each seed the SFT model and each policy
answer the held-out prompts (temperature 1, sampled with the seed) and are scored: parse
rate (the gold reward), proxy reward, KL to the SFT model, and the share of distinct
answers (a policy that found one answer the reward likes gives it to many prompts).
Writes ``DIR/results.json``: {"sft", "ppo", "ppo_gold", "dpo", "grpo": {"parse_rate",
"proxy_reward", "kl", "response_tokens", "distinct" (means over seeds),
"worst_parse_rate", "per_seed"}, "reward_model": {"val_accuracy"}, "eval_prompts"}.
About 20 minutes on a 2-core CPU before the first seed, then 20 minutes a seed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from genjax import dpo, lm, reward_model, rlhf, run, sft
from genjax.rl import data as rldata
from genjax.rl import python_task

# Prompt tokens (with the leading <eod>) and response tokens: 64 each, or half the
# base model's context when that is shorter.
LENGTH = 64
SAMPLES_PER_PROMPT = 4  # the SFT model's answers to a prompt, to label in pairs
SAMPLE_ROWS = 256  # answers drawn at once
EVAL_PROMPTS = 128  # held-out prompts each policy answers


def write_data(d: pathlib.Path, tok, length: int) -> dict[str, pathlib.Path]:
    """pairs.jsonl (for SFT), then the prompts that fit with their reference bodies:
    prompts.jsonl (training) and held_out.jsonl (the held-out ones); written once."""
    paths = {name: d / "data" / f"{name}.jsonl" for name in ("pairs", "prompts", "held_out")}
    if all(p.exists() for p in paths.values()):
        return paths
    train_files, _ = lm.corpus_split(lm.DataConfig())
    pairs = python_task.function_pairs(train_files)
    train_pairs, val_pairs = rldata.split(pairs, 0.1)

    def fits(p) -> bool:
        return len(tok.encode(p["prompt"])) < length and len(tok.encode(p["response"])) < length

    records = {
        "pairs": pairs,
        "prompts": [p for p in train_pairs if fits(p)],
        "held_out": [p for p in val_pairs if fits(p)],
    }
    for name, rows in records.items():
        rldata.write_jsonl(paths[name], rows)
    return paths


def write_preferences(d: pathlib.Path, paths: dict, length: int, limit: int | None) -> None:
    """preferences.jsonl: the SFT model's answers to the training and the held-out
    prompts (the first ``limit`` of each), paired by the gold reward; written once. The
    reward model holds out the held-out prompts' pairs (the same hash splits both)."""
    path = preferences(d)
    if path.exists():
        return
    records = [record for name in ("prompts", "held_out")
               for record in rldata.read_jsonl(paths[name], rldata.SFT_FIELDS)[:limit]]  # fmt: skip
    model = sft.base_model(d / "sft")
    tok = sft.base_tokenizer(d / "sft", model)
    params = sft.load_base(d / "sft")
    prompts = [r["prompt"] for r in records for _ in range(SAMPLES_PER_PROMPT)]
    responses = []
    for start in range(0, len(prompts), SAMPLE_ROWS):
        chunk = prompts[start : start + SAMPLE_ROWS]
        responses += rlhf.sample(model, params, tok, chunk, max_new_tokens=length,
                                 seed=start, prompt_len=length).responses  # fmt: skip
    k = SAMPLES_PER_PROMPT
    samples = [responses[i : i + k] for i in range(0, len(responses), k)]
    gold = python_task.writes_a_body(prompts, responses)
    print(f"the SFT model's answers to {len(records):,} prompts: "
          f"{np.mean(gold):.1%} write a body")  # fmt: skip
    rldata.write_jsonl(path, python_task.preference_pairs(
        [r["prompt"] for r in records], samples, [r["response"] for r in records]))  # fmt: skip


POLICIES = ("ppo", "ppo_gold", "dpo", "grpo")
GOLD = "genjax.rl.python_task:writes_a_body"


def stages(d: pathlib.Path, base: str, paths: dict, length: int) -> dict:
    """The stages run once: SFT, then the reward model on the SFT model's answers."""
    rows = [f"data.seq_len={2 * length}", "data.global_batch_size=16", "optim.lr=3e-4"]
    return {
        "sft": (sft.FAMILY, [f"base={base}", f"data.path={paths['pairs']}", *rows]),
        "rm": (reward_model.FAMILY, [f"base={d / 'sft'}", f"data.path={preferences(d)}", *rows]),
    }


def policy_stages(d: pathlib.Path, paths: dict, length: int, seed: int) -> dict:
    """The stages run once a seed, each starting from the SFT model."""
    seeded = [f"data.seed={seed}", f"run.seed={seed}"]
    rl = [f"base={d / 'sft'}", f"data.path={paths['prompts']}", f"data.prompt_len={length}",
          f"rl.max_new_tokens={length}", "rl.minibatches=2", "rl.epochs=2", "optim.lr=3e-5",
          "run.log_every=5", *seeded]  # fmt: skip
    return {
        "ppo": (rlhf.FAMILY, [*rl, f"rl.reward={d / 'rm'}", "rl.prompts_per_update=16"]),
        "ppo_gold": (rlhf.FAMILY, [*rl, f"rl.reward={GOLD}", "rl.prompts_per_update=16"]),
        "dpo": (dpo.FAMILY, [f"base={d / 'sft'}", f"data.path={preferences(d)}",
                             f"data.seq_len={2 * length}", "data.global_batch_size=16",
                             "optim.lr=3e-5", "beta=0.1", *seeded]),
        "grpo": (rlhf.FAMILY, [*rl, f"rl.reward={d / 'rm'}", "rl.algorithm=grpo",
                               "rl.prompts_per_update=8", "rl.group_size=4"]),
    }  # fmt: skip


def preferences(d: pathlib.Path) -> pathlib.Path:
    return d / "data" / "preferences.jsonl"


def train(family: run.Family, assignments: list[str], workdir: pathlib.Path, steps: int) -> None:
    cadence = [f"run.steps={steps}", f"run.checkpoint_every={steps}"]
    if family is not rlhf.FAMILY:
        cadence.append(f"run.eval_every={steps}")
    print(f"== {family.name}: {workdir}", flush=True)
    run.train_to_end(run.configure(family, "default", [*assignments, *cadence]), workdir, family)


def score(model, params, reference, tok, prompts: list[str], d: pathlib.Path, length: int,
          seed: int) -> dict:  # fmt: skip
    """A policy's answers to the held-out prompts (sampled with ``seed``), scored."""
    scores, s = rlhf.evaluate_policy(
        model, params, reference, tok, prompts, gold=python_task.writes_a_body,
        reward_model_dir=d / "rm", max_new_tokens=length, prompt_len=length, seed=seed,
    )  # fmt: skip
    distinct = len({r.strip() for r in s.responses}) / len(s.responses)
    return {"parse_rate": scores.pop("gold_reward"), **scores, "distinct": distinct}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--base", required=True, help="the pre-trained LM run (its workdir)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the PPO, DPO and GRPO stages")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps per stage")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds} must be >= 1")
    d = pathlib.Path(args.workdir)
    steps = (dict(sft=4, rm=4, ppo=2, ppo_gold=2, dpo=2, grpo=2) if args.quick
             else dict(sft=300, rm=200, ppo=100, ppo_gold=100, dpo=100, grpo=50))  # fmt: skip
    preference_prompts = 24 if args.quick else None  # of each split; None: every prompt
    try:
        base = str(pathlib.Path(args.base).resolve())
        rlhf.check_pipeline_workdir(d, {"quick": args.quick, "base": base})
        base_model = sft.base_model(args.base)
        length = min(LENGTH, base_model.max_seq_len // 2)
        paths = write_data(d, sft.base_tokenizer(args.base, base_model), length)
        for name, (family, assignments) in stages(d, args.base, paths, length).items():
            if name == "rm":  # its pairs are the SFT model's answers
                write_preferences(d, paths, length, preference_prompts)
            train(family, assignments, d / name, steps[name])
        model = sft.base_model(d / "sft")
        tok = sft.base_tokenizer(d / "sft", model)
        reference = sft.load_base(d / "sft")
        held_out = rldata.read_jsonl(paths["held_out"], ("prompt",))[:EVAL_PROMPTS]
        prompts = [r["prompt"] for r in held_out]
        per_seed = {m: [] for m in ("sft", *POLICIES)}
        for seed in range(args.seeds):
            per_seed["sft"].append(score(model, reference, reference, tok, prompts, d, length,
                                         seed))  # fmt: skip
            for method, (family, assignments) in policy_stages(d, paths, length, seed).items():
                workdir = d / f"seed{seed}" / method
                train(family, assignments, workdir, steps[method])
                load = dpo.load_policy if method == "dpo" else rlhf.load_policy
                per_seed[method].append(score(model, load(workdir)[1], reference, tok, prompts,
                                              d, length, seed))  # fmt: skip
    except run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except run.Stopped as e:  # the next stages would start from an unfinished one
        print(f"stopped: {e}", file=sys.stderr)
        return run.EXIT_STOPPED
    results = {m: rlhf.over_seeds(rows, "parse_rate") for m, rows in per_seed.items()}
    logged = [json.loads(line) for line in (d / "rm" / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["val_accuracy"] for r in logged if "val_accuracy" in r]
    # None where no pair was held out: every held-out prompt's answers passed.
    results["reward_model"] = {"val_accuracy": accuracies[-1] if accuracies else None}
    results["eval_prompts"] = len(prompts)
    (d / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{len(prompts)} held-out prompts, {args.seeds} seed(s); means over seeds")
    print(f"{'method':8s} {'parse':>6s} {'worst':>6s} {'proxy':>6s} {'KL':>6s} {'tokens':>6s} "
          f"{'distinct':>8s}")  # fmt: skip
    for method in per_seed:
        r = results[method]
        print(f"{method:8s} {r['parse_rate']:6.3f} {r['worst_parse_rate']:6.3f} "
              f"{r['proxy_reward']:6.3f} {r['kl']:6.3f} {r['response_tokens']:6.1f} "
              f"{r['distinct']:8.0%}")  # fmt: skip
    accuracy = results["reward_model"]["val_accuracy"]
    print("reward model held-out pairwise accuracy: "
          + (f"{accuracy:.1%}" if accuracy is not None else "no pair held out"))  # fmt: skip
    print(f"wrote {d / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
