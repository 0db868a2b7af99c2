"""RL fine-tuning of language models: rollout rows and rewards, the whole random-walks
pipeline (pre-train → SFT → reward model → PPO, DPO, GRPO) at smoke size, PPO raising a
reward, sharded PPO equal to one device, kill-and-resume, and bad input."""

import json
import pathlib
import runpy
import shutil
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import mesh as meshlib
from genjax import reward_model, rlhf, run
from genjax.rl import python_task, walks
from genjax.tokenizer import Tokenizer
from tests.families import train_by_hand

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_assemble_shifts_rows_to_the_start_and_masks_the_response():
    # Two prompts left-padded to 4 (pad 0, eod 2); responses of 2 tokens + eod, and 3
    # tokens cut off (no eod); -1 after a row stopped.
    prompt = jnp.array([[0, 0, 2, 7], [0, 2, 8, 9]])
    start = jnp.array([2, 1])
    new = jnp.array([[5, 6, 2, -1], [4, 4, 4, 4]])
    tokens, mask, ended = rlhf.assemble(prompt, start, new, eod=2, pad=0)
    np.testing.assert_array_equal(tokens[0], [2, 7, 5, 6, 2, 0, 0, 0])
    np.testing.assert_array_equal(tokens[1], [2, 8, 9, 4, 4, 4, 4, 0])
    # Target t predicts token t + 1: row 0's response is tokens 2..4 (targets 1..3).
    np.testing.assert_array_equal(mask[0], [0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(mask[1], [0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(ended, [True, False])


def test_score_lands_on_the_last_response_token_and_gae_sums_it_back():
    mask = jnp.array([[0.0, 1, 1, 1, 0]])
    kl = jnp.array([[9.0, 0.1, 0.2, 0.3, 9.0]])
    reward = rlhf.token_rewards(jnp.array([2.0]), kl, mask, kl_coef=0.5)
    np.testing.assert_allclose(reward[0], [0, -0.05, -0.1, 2 - 0.15, 0], rtol=1e-6)
    cfg = rlhf.RLConfig(gamma=1.0, lam=1.0)
    adv, ret = rlhf.advantages(cfg, reward, jnp.zeros_like(reward), mask)
    # γ = λ = 1, V = 0: each token's advantage is the reward still to come.
    np.testing.assert_allclose(adv[0, 1:4], [1.7, 1.75, 1.85], rtol=1e-5)
    np.testing.assert_allclose(ret, adv, rtol=1e-6)


@pytest.fixture(scope="module")
def walks_run(tmp_path_factory, load_script):
    """The random-walks pipeline at smoke size: every stage's run, results and picture."""
    d = tmp_path_factory.mktemp("walks")
    script = load_script("experiments/rlhf_random_walks.py")
    assert script.main(["--workdir", str(d), "--quick", "--seeds", "2"]) == 0
    return d


@pytest.mark.slow
def test_random_walks_pipeline_writes_results_and_frontier(walks_run):
    results = json.loads((walks_run / "results.json").read_text())
    for method in ("sft", "ppo", "dpo", "grpo"):
        r = results[method]
        assert set(r) >= {"gold_reward", "proxy_reward", "kl", "invalid_rate"}
        assert 0 <= r["worst_gold_reward"] <= r["gold_reward"] <= 1 and 0 <= r["invalid_rate"] <= 1
        # Each of the two seeds its own runs and scores; the summary their mean.
        assert len(r["per_seed"]["gold_reward"]) == 2
        assert r["kl"] == pytest.approx(np.mean(r["per_seed"]["kl"]))
        if method != "sft":  # the SFT model's KL to itself is 0 on every seed
            assert r["per_seed"]["kl"][0] != r["per_seed"]["kl"][1]
    for seed in (0, 1):
        assert all((walks_run / f"seed{seed}" / m).is_dir() for m in ("ppo", "dpo", "grpo"))
    assert results["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)  # against itself
    assert 0.5 <= results["reward_model"]["val_accuracy"] <= 1.0
    assert (walks_run / "frontier.png").read_bytes()[:8] == PNG


def count_a(prompts, responses):
    """A bandit reward: the share of a response's letters that are "a"."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def rl_config(walks_run, *extra):
    prompts = walks_run / "data" / "prompts.jsonl"
    return run.configure(rlhf.FAMILY, "tiny", [
        f"base={walks_run / 'sft'}", f"data.path={prompts}", "data.prompt_len=4",
        "rl.reward=tests.test_rlhf:count_a", "rl.max_new_tokens=4", "rl.truncation_penalty=None",
        *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_ppo_raises_a_bandit_reward(walks_run, tmp_path):
    cfg = rl_config(walks_run, "rl.prompts_per_update=32", "rl.minibatches=2", "optim.lr=3e-3",
                    "run.steps=24", "run.checkpoint_every=24", "rl.kl_coef=0")  # fmt: skip
    run.train(cfg, tmp_path, rlhf.FAMILY)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    scores = [r["score"] for r in rows if "score" in r]
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.2, scores


@pytest.mark.slow
def test_sharded_ppo_equals_one_device(walks_run):
    cfg = rl_config(walks_run, "rl.prompts_per_update=8", "rl.minibatches=2")
    metrics = ("loss", "score", "kl", "response_length")
    one, state_one = train_by_hand(
        rlhf.FAMILY, cfg, meshlib.make_mesh("data=1", jax.devices()[:1]), 2, metrics
    )
    many, state_many = train_by_hand(
        rlhf.FAMILY, cfg, meshlib.make_mesh("data=4,fsdp=2"), 2, metrics
    )
    np.testing.assert_allclose(many, one, rtol=2e-4, atol=1e-5)
    leaves = zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_many.params), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-3, atol=2e-5)


@pytest.mark.slow
def test_ppo_killed_and_resumed_equals_an_uninterrupted_run(walks_run, tmp_path):
    whole = tmp_path / "whole"
    run.train(rl_config(walks_run, "run.steps=4"), whole, rlhf.FAMILY)
    parts = tmp_path / "parts"
    run.train(rl_config(walks_run, "run.steps=2"), parts, rlhf.FAMILY)  # stops at step 2
    run.train(rl_config(walks_run, "run.steps=4"), parts, rlhf.FAMILY)  # resumes: same rollouts
    a = run.load(whole, rlhf.FAMILY).state
    b = run.load(parts, rlhf.FAMILY).state
    assert int(a.step) == int(b.step) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rlhf_bad_input_is_one_clear_error(walks_run, tmp_path, capsys):
    def main(data, reward="tests.test_rlhf:count_a", *sets):
        argv = ["--workdir", str(tmp_path / "w"), "--preset", "tiny", "--base",
                str(walks_run / "sft"), "--data", str(data), "--reward", reward, "--set",
                "data.prompt_len=4", "rl.max_new_tokens=4", *sets]  # fmt: skip
        return run.main(rlhf.FAMILY, argv)

    prompts = walks_run / "data" / "prompts.jsonl"
    # A reference trained with another tokenizer: the vocabularies differ.
    other = tmp_path / "other"
    other.mkdir()
    text = pathlib.Path(__file__).read_text()
    Tokenizer.train([text], vocab_size=400, model_path=other / "tokenizer.model")
    assert main(prompts, "tests.test_rlhf:count_a", f"rl.reference={other}") == 2
    assert "different vocabularies" in capsys.readouterr().err
    assert main(prompts, "nope:fn") == 2
    assert "cannot import" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "b"}) + "\n")
    assert main(bad) == 2
    assert "bad.jsonl:1: missing field 'prompt'" in capsys.readouterr().err
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "bcdefg"}) + "\n")
    assert main(long) == 2
    assert "more than data.prompt_len=4" in capsys.readouterr().err


def test_reward_normalization_reads_a_bounded_sample_spanning_the_file():
    rows = {"chosen": np.arange(5000), "rejected": -np.arange(5000)}
    sample = reward_model.normalization_sample(rows)
    assert len(sample["chosen"]) == reward_model.NORMALIZATION_PAIRS
    assert sample["chosen"][0] == 0 and sample["chosen"][-1] == 4999
    np.testing.assert_array_equal(sample["rejected"], -sample["chosen"])  # pairs stay pairs
    few = {k: v[:10] for k, v in rows.items()}
    np.testing.assert_array_equal(reward_model.normalization_sample(few)["chosen"], np.arange(10))


def test_walks_gold_reward():
    g = walks.GRAPH
    shortest = g.shortest()
    start = int(np.argmax(shortest))  # a node with the longest shortest path
    # Follow the BFS distances down to the goal: a shortest path scores 1.
    path = [start]
    while path[-1] != walks.GOAL:
        here = path[-1]
        path.append(next(j for j in np.nonzero(g.adjacency[here])[0]
                         if shortest[j] == shortest[here] - 1))  # fmt: skip
    text = "".join(walks.LETTERS[i] for i in path)
    assert walks.gold_reward([text[0]], [text[1:]]) == [pytest.approx(1.0)]
    assert walks.gold_reward([text[0]], [text[1:] + "b"]) == [0.0]  # letters after the goal
    assert walks.gold_reward([text[0]], ["z"]) == [0.0]
    assert walks.invalid([text[0], text[0]], [text[1:], "?"]) == [False, True]


def test_python_gold_reward_parses_without_printing_a_warning(tmp_path):
    prompt = 'def f(x):\n    """Doc."""\n'
    # "1if" and "\(" parse but draw a SyntaxWarning (a DeprecationWarning before Python
    # 3.12 for the escape); raised as errors, they would not parse.
    responses = ["    return 1if x else 2\n", "    return (x\n", "    return x +\n"]
    escape = '    return "\\("\n'
    source = tmp_path / "escape.py"
    source.write_text(prompt + "    x = 1\n" + escape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert python_task.writes_a_body([prompt] * 3, responses) == [1.0, 0.0, 0.0]
        assert python_task.writes_a_body([prompt], [escape]) == [1.0]
        assert python_task.function_pairs([source]) == [
            {"prompt": prompt, "response": "    x = 1\n" + escape}
        ]


def test_python_gold_reward_asks_for_a_body_that_is_no_stub():
    prompt = 'async def f(x):\n    """Doc."""\n'
    responses = ["    pass\n", "    ...\n", '    "more doc"\n', "", "    pass\nx = 1\n",
                 "    raise NotImplementedError\n", "    raise NotImplementedError('f')\n",
                 "    return x\n", "    pass\n    await x\n", "    raise ValueError(x)\n",
                 "    raise\n", "    return (x\n"]  # fmt: skip
    expected = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert python_task.writes_a_body([prompt] * len(responses), responses) == expected


def test_python_preferences_pair_a_rejected_answer_with_an_accepted_one_or_the_reference():
    prompts = ["def f(x):\n", "def g():\n", "def h():\n"]
    samples = [
        ["    return (\n", "    return x\n", "    return 2 * x\n"],  # one fails
        ["", "    pass\n", "    return (\n"],  # all fail; an empty answer is never paired
        ["    return 1\n", "    return 2\n", "    return 3\n"],  # all pass: no pair
    ]
    references = ["    return -x\n", "    return 0\n", "    return 1\n"]
    assert python_task.preference_pairs(prompts, samples, references) == [
        {"prompt": "def f(x):\n", "chosen": "    return x\n", "rejected": "    return (\n"},
        {"prompt": "def g():\n", "chosen": "    return 0\n", "rejected": "    pass\n"},
    ]
    # A reference the gold reward rejects is no chosen answer.
    assert python_task.preference_pairs(prompts[1:2], samples[1:2], ["    pass\n"]) == []


def test_scores_over_seeds_are_means_with_the_worst_seed_and_each_seed_kept():
    rows = [{"gold_reward": 0.5, "kl": 1.0}, {"gold_reward": 0.75, "kl": 3.0}]
    assert rlhf.over_seeds(rows, "gold_reward") == {
        "gold_reward": 0.625, "kl": 2.0, "worst_gold_reward": 0.5,
        "per_seed": {"gold_reward": [0.5, 0.75], "kl": [1.0, 3.0]},
    }  # fmt: skip


@pytest.mark.parametrize("script", ["rlhf_random_walks.py", "rlhf_python.py"])
def test_pipelines_refuse_no_seeds_before_writing(script, load_script, tmp_path, capsys):
    workdir = tmp_path / "run"
    base = [] if script == "rlhf_random_walks.py" else ["--base", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        load_script(f"experiments/{script}").main(
            ["--workdir", str(workdir), *base, "--seeds", "0"]
        )
    assert exit_.value.code == 2
    assert "--seeds 0 must be >= 1" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.slow
def test_a_pipeline_refuses_a_workdir_made_with_other_settings(walks_run, load_script, capsys):
    """A full run in a --quick run's workdir would resume its stages (its data, its step
    counts) and report them as a full run's."""
    stamp = {p: p.stat().st_mtime_ns for p in walks_run.rglob("*") if p.is_file()}
    script = load_script("experiments/rlhf_random_walks.py")
    assert script.main(["--workdir", str(walks_run), "--seeds", "1"]) == 2
    assert "made otherwise (quick: True there, False asked)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in walks_run.rglob("*") if p.is_file()} == stamp


@pytest.mark.parametrize("script", ["rlhf_random_walks.py", "rlhf_python.py"])
def test_pipelines_stop_at_a_stage_a_signal_stopped(
    script, load_script, stdlib_lm, tmp_path, monkeypatch, capsys
):
    """A stage that SIGTERM stopped is unfinished: the next stages must not start from it."""
    trained = []

    def stopped_by_sigterm(cfg, workdir, family):
        trained.append(family.name)
        return run.FitResult(state=types.SimpleNamespace(step=7), stopped_by_signal="SIGTERM")

    monkeypatch.setattr(run, "train", stopped_by_sigterm)
    base = [] if script == "rlhf_random_walks.py" else ["--base", str(stdlib_lm[0])]
    argv = ["--workdir", str(tmp_path), *base, "--quick", "--seeds", "1"]
    assert load_script(f"experiments/{script}").main(argv) == run.EXIT_STOPPED
    assert len(trained) == 1
    assert f"stopped: {trained[0]} stopped by SIGTERM at step 7 of " in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_python_pipeline_reports_parse_rates(stdlib_lm, tmp_path, load_script):
    base, _ = stdlib_lm
    script = load_script("experiments/rlhf_python.py")
    argv = ["--workdir", str(tmp_path), "--base", str(base), "--quick", "--seeds", "1"]
    assert script.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("sft", "ppo", "ppo_gold", "dpo", "grpo"):
        r = results[method]
        assert 0 <= r["worst_parse_rate"] <= r["parse_rate"] <= 1
        assert {"proxy_reward", "kl"} <= set(r)
        assert 0 < r["distinct"] <= 1
        assert len(r["per_seed"]["parse_rate"]) == 1
    assert (tmp_path / "seed0" / "grpo").is_dir()
    assert results["sft"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert results["eval_prompts"] > 0
    assert 0 <= results["reward_model"]["val_accuracy"] <= 1  # held-out prompts' pairs
    preferences = [json.loads(line) for line in (tmp_path / "data" / "preferences.jsonl").open()]
    prompts = {name: [json.loads(line)["prompt"] for line in (tmp_path / "data" / name).open()]
               for name in ("prompts.jsonl", "held_out.jsonl")}  # fmt: skip
    asked = set(prompts["prompts.jsonl"][:24]) | set(prompts["held_out.jsonl"][:24])
    assert preferences and {p["prompt"] for p in preferences} <= asked
    assert all(
        python_task.writes_a_body([p["prompt"]] * 2, [p["chosen"], p["rejected"]]) == [1.0, 0.0]
        for p in preferences
    )


def run_command(script: str, argv: list[str], monkeypatch) -> int:
    """The exit code of ``python script argv...``, run in this process."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return exit_.value.code


@pytest.mark.slow
def test_stage_commands_run_from_an_sft_run(walks_run, tmp_path, monkeypatch):
    data = walks_run / "data"
    sft_run = str(walks_run / "sft")
    tiny = ["--preset", "tiny", "--steps", "2", "--checkpoint-every", "2", "--set"]
    rows = ["data.seq_len=16", "run.eval_every=2"]
    argv = ["--workdir", str(tmp_path / "rm"), "--base", sft_run, "--data",
            str(data / "preferences.jsonl"), *tiny, *rows]  # fmt: skip
    assert run_command("experiments/reward_model.py", argv, monkeypatch) == 0
    assert json.loads((tmp_path / "rm" / "normalization.json").read_text())["std"] > 0
    argv = ["--workdir", str(tmp_path / "dpo"), "--base", sft_run, "--data",
            str(data / "preferences.jsonl"), *tiny, *rows]  # fmt: skip
    assert run_command("experiments/dpo.py", argv, monkeypatch) == 0
    argv = ["--workdir", str(tmp_path / "ppo"), "--base", sft_run, "--data",
            str(data / "prompts.jsonl"), "--reward", str(tmp_path / "rm"), *tiny,
            "data.prompt_len=4", "rl.max_new_tokens=4", "optim.eps_style=tensorflow"]  # fmt: skip
    assert run_command("experiments/rlhf.py", argv, monkeypatch) == 0
    logged = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open()]
    assert any("kl" in r and "score" in r for r in logged)


@pytest.mark.slow
def test_a_reward_model_whose_statistics_are_of_another_step_is_unfinished(walks_run, tmp_path):
    """A run killed after a later checkpoint: its statistics are the earlier step's."""
    rm = tmp_path / "rm"
    shutil.copytree(walks_run / "rm", rm)
    reward_model.load(rm)
    stats = json.loads((rm / "normalization.json").read_text())
    (rm / "normalization.json").write_text(json.dumps({**stats, "step": stats["step"] - 1}))
    with pytest.raises(ValueError, match=f"statistics of step {stats['step'] - 1}, but the newest"):
        reward_model.load(rm)
