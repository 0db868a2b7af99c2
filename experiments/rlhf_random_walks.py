"""The whole post-training pipeline on random walks, where the gold reward is exact.

    python experiments/rlhf_random_walks.py --workdir runs/walks [--seeds 3] [--quick]

The task (``genjax.rl.walks``, after trlx's example): a random directed graph on the
letters a–u, walks of at most 10 letters toward ``a``; the gold reward of a walk is its
optimality against the shortest path (0 when invalid). Stages, each a run of the shared
run layer in its own workdir (re-running resumes where it stopped):

    DIR/lm     pre-train a small transformer on 20,000 random walks (a character tokenizer)
    DIR/sft    fine-tune it on the walks that reached the goal
    DIR/rm     a reward model on 4,000 preference pairs labelled by the gold reward
    DIR/seed<k>/ppo, dpo, grpo
               PPO against the reward model with a KL penalty to the SFT model; DPO on
               the preference pairs; GRPO against the reward model; per seed

Each policy (and the SFT model) is then sampled at temperature 1, 40 responses per
start node, and scored: gold reward, proxy reward (the reward model, normalized),
KL to the SFT model (the mean over samples of log π − log π_sft) and the invalid-walk
rate. Writes ``DIR/results.json`` (each method's means over seeds, with the per-seed
values) and ``DIR/frontier.png`` (gold reward against KL to SFT). About 5 minutes on a
2-core CPU for 3 seeds; ``--quick`` is a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from genjax import dpo, lm, reward_model, rlhf, run, sft
from genjax.rl import walks

# A character tokenizer: 3 specials + 256 bytes + the 21 letters and the newline.
VOCAB = 259 + len(walks.LETTERS) + 1
MODEL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=4",
         "model.head_dim=16", "model.ffn_dim=256", "model.max_seq_len=32",
         f"model.vocab_size={VOCAB}"]  # fmt: skip
MAX_NEW = walks.GRAPH.max_length  # the response: up to 9 letters and <eod>
PROMPT_LEN = 4


def stages(paths: dict, steps: dict[str, int], d: pathlib.Path) -> dict[str, tuple]:
    """Each stage: (family, preset, assignments) of its run."""
    rows = ["data.seq_len=16", "data.global_batch_size=32", "optim.lr=1e-3"]
    return {
        "lm": (lm.FAMILY, "tiny", [
            f"data.corpus=('{paths['corpus']}',)", "data.val_fraction=0.125",
            "data.global_batch_size=32", "sample.tokens=0", *MODEL,
            f"run.steps={steps['lm']}", f"run.checkpoint_every={steps['lm']}",
        ]),
        "sft": (sft.FAMILY, "tiny", [
            f"base={d / 'lm'}", f"data.path={paths['sft']}", *rows,
            f"run.steps={steps['sft']}", f"run.checkpoint_every={steps['sft']}",
            f"run.eval_every={steps['sft']}",
        ]),
        "rm": (reward_model.FAMILY, "tiny", [
            f"base={d / 'sft'}", f"data.path={paths['preferences']}", *rows,
            f"run.steps={steps['rm']}", f"run.checkpoint_every={steps['rm']}",
            f"run.eval_every={steps['rm']}",
        ]),
    }  # fmt: skip


def policy_stages(paths: dict, steps: dict[str, int], d: pathlib.Path, seed: int) -> dict:
    rl = [f"base={d / 'sft'}", f"data.path={paths['prompts_jsonl']}", f"data.seed={seed}",
          f"rl.reward={d / 'rm'}", f"data.prompt_len={PROMPT_LEN}",
          f"rl.max_new_tokens={MAX_NEW}", "rl.epochs=4", "optim.lr=1e-4",
          f"run.seed={seed}", f"run.steps={steps['rl']}", f"run.checkpoint_every={steps['rl']}",
          "run.log_every=10"]  # fmt: skip
    return {
        "ppo": (rlhf.FAMILY, "default", [*rl, "rl.prompts_per_update=32", "rl.minibatches=4",
                                         "rl.kl_coef=0.05"]),
        "grpo": (rlhf.FAMILY, "default", [*rl, "rl.algorithm=grpo", "rl.prompts_per_update=8",
                                          "rl.group_size=4", "rl.minibatches=4",
                                          "rl.kl_coef=0.05"]),
        "dpo": (dpo.FAMILY, "default", [
            f"base={d / 'sft'}", f"data.path={paths['preferences']}", "data.seq_len=16",
            "data.global_batch_size=32", f"data.seed={seed}", "optim.lr=1e-4", "beta=0.1",
            f"run.seed={seed}", f"run.steps={steps['dpo']}",
            f"run.checkpoint_every={steps['dpo']}", f"run.eval_every={steps['dpo']}",
        ]),
    }  # fmt: skip


def train(family, preset: str, assignments: list[str], workdir: pathlib.Path) -> None:
    print(f"== {family.name}: {workdir}", flush=True)
    run.train_to_end(run.configure(family, preset, assignments), workdir, family)


def score(model, params, reference, tok, rm_dir, samples_per_start: int, seed: int) -> dict:
    """Gold and proxy reward, KL to the SFT model and the invalid rate of samples."""
    prompts = list(walks.LETTERS[1:]) * samples_per_start
    scores, s = rlhf.evaluate_policy(
        model, params, reference, tok, prompts, gold=walks.gold_reward, reward_model_dir=rm_dir,
        max_new_tokens=MAX_NEW, prompt_len=PROMPT_LEN, seed=seed,
    )  # fmt: skip
    return {**scores, "invalid_rate": float(np.mean(walks.invalid(s.prompts, s.responses)))}


def draw_frontier(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, r in per_seed_results(results).items():
        ax.scatter(r["per_seed"]["kl"], r["per_seed"]["gold_reward"], label=method, alpha=0.8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel("gold reward (optimality)")
    ax.set_title("random walks: reward against KL, one point per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_seed_results(results: dict) -> dict:
    return {m: r for m, r in results.items() if "per_seed" in r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the PPO, DPO and GRPO stages")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps per stage")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds} must be >= 1")
    d = pathlib.Path(args.workdir)
    try:
        rlhf.check_pipeline_workdir(d, {"quick": args.quick})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = walks.write_task(d / "data", walks=2_000 if args.quick else 20_000,
                             pairs=400 if args.quick else 4_000)  # fmt: skip
    paths["prompts_jsonl"] = d / "data" / "prompts.jsonl"
    paths["prompts_jsonl"].write_text(
        "".join(json.dumps({"prompt": c}) + "\n" for c in walks.LETTERS[1:])
    )
    steps = (dict(lm=150, sft=30, rm=20, rl=4, dpo=4) if args.quick
             else dict(lm=1000, sft=300, rm=300, rl=200, dpo=200))  # fmt: skip
    samples_per_start = 4 if args.quick else 40
    try:
        for name, (family, preset, assignments) in stages(paths, steps, d).items():
            train(family, preset, assignments, d / name)
        sft_dir = d / "sft"
        model = sft.base_model(sft_dir)
        tok = sft.base_tokenizer(sft_dir, model)
        reference = sft.load_base(sft_dir)
        per_seed = {m: [] for m in ("sft", "ppo", "dpo", "grpo")}
        for seed in range(args.seeds):
            per_seed["sft"].append(score(model, reference, reference, tok, d / "rm",
                                         samples_per_start, seed))  # fmt: skip
            for method, stage in policy_stages(paths, steps, d, seed).items():
                workdir = d / f"seed{seed}" / method
                train(*stage, workdir)
                load = dpo.load_policy if method == "dpo" else rlhf.load_policy
                _, params = load(workdir)
                per_seed[method].append(score(model, params, reference, tok, d / "rm",
                                              samples_per_start, seed))  # fmt: skip
    except run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except run.Stopped as e:  # the next stages would start from an unfinished one
        print(f"stopped: {e}", file=sys.stderr)
        return run.EXIT_STOPPED
    results = {m: rlhf.over_seeds(rows, "gold_reward") for m, rows in per_seed.items()}
    logged = [json.loads(line) for line in (d / "rm" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val_accuracy"] for r in logged if "val_accuracy" in r][-1]
    results["reward_model"] = {"val_accuracy": accuracy}
    (d / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    draw_frontier(results, d / "frontier.png")
    print(f"{'method':6s} {'gold':>6s} {'worst':>6s} {'proxy':>6s} {'KL':>6s} {'invalid':>8s}")
    for method, r in per_seed_results(results).items():
        print(f"{method:6s} {r['gold_reward']:6.3f} {r['worst_gold_reward']:6.3f} "
              f"{r['proxy_reward']:6.3f} {r['kl']:6.3f} {r['invalid_rate']:8.3f}")  # fmt: skip
    print(f"reward model held-out pairwise accuracy: {accuracy:.4f}")
    print(f"wrote {d / 'results.json'} and {d / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
