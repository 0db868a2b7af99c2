"""Supervised fine-tuning: rows and masks, the run from a base LM, bad input."""

import json
import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import lm, run, sft
from genjax.models import transformer
from genjax.rl import data as rldata
from genjax.rl import python_task

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pair_row_masks_the_prompt_and_the_padding():
    tokens, mask = rldata.pair_row([5, 6], [7, 8, 9], seq_len=8, eod=2, pad=0)
    np.testing.assert_array_equal(tokens, [2, 5, 6, 7, 8, 9, 2, 0, 0])
    # target j is token j + 1: prompt targets 5, 6 masked; 7, 8, 9 and the closing <eod>
    # count; padding does not.
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 1, 0, 0])
    cut_tokens, cut_mask = rldata.pair_row([5, 6], [7, 8, 9], seq_len=4, eod=2, pad=0)
    np.testing.assert_array_equal(cut_tokens, [2, 5, 6, 7, 8])
    np.testing.assert_array_equal(cut_mask, [0, 0, 1, 1])
    assert rldata.pair_row([5, 6, 7, 8], [9], seq_len=4, eod=2, pad=0) is None


def test_the_loss_reads_only_response_targets():
    # The gradient of the LM loss of an SFT row: prompt targets and padding have none.
    cfg = transformer.get_preset("tiny")
    params = transformer.init(cfg, jax.random.key(0))
    tokens, mask = rldata.pair_row([5, 6, 7], [8, 9], seq_len=10, eod=2, pad=0)
    batch = {"tokens": jnp.asarray(tokens)[None], "mask": jnp.asarray(mask)[None]}

    def loss_of_nll(nll_BT):
        return jnp.sum(nll_BT * batch["mask"]) / jnp.sum(batch["mask"])

    nll = transformer.token_nll(cfg, params, batch["tokens"])
    grad = jax.grad(loss_of_nll)(nll)
    np.testing.assert_array_equal(np.asarray(grad[0]) != 0, mask.astype(bool))
    loss, _ = transformer.loss(cfg, params, batch)
    assert float(loss) == pytest.approx(float(loss_of_nll(nll)), rel=1e-6)
    # Other prompt-free padding changes nothing: the loss is the same with junk padding.
    junk = batch | {"tokens": batch["tokens"].at[0, 7:].set(11)}
    assert float(transformer.loss(cfg, params, junk)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_split_holds_out_by_prompt():
    pairs = [{"prompt": f"p{i}", "response": "r"} for i in range(200)]
    train, val = rldata.split(pairs, 0.1)
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    assert rldata.split(pairs, 0.1) == (train, val)  # stable


@pytest.mark.slow
def test_sft_starts_from_the_base_and_lowers_the_response_loss(stdlib_lm, tmp_path, load_script):
    base, _ = stdlib_lm
    script = load_script("experiments/sft.py")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    packages = ("json", "html", "email", "logging")
    files = [f for name in packages for f in (stdlib / name).rglob("*.py")]
    pairs = python_task.function_pairs(sorted(files), max_prompt_lines=2, max_body_lines=3)
    assert len(pairs) > 20 and all(p["response"].strip() for p in pairs)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    argv = ["--workdir", str(tmp_path / "sft"), "--base", str(base), "--data", str(data),
            "--preset", "tiny", "--set", "run.steps=8", "optim.lr=3e-3",
            "data.seq_len=64"]  # fmt: skip
    assert script.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").open()]
    val = [r["val_response_nll"] for r in rows if "val_response_nll" in r]
    assert len(val) >= 2 and val[-1] < val[0]
    # Step 0 was the base: the first checkpoint's weights moved away from the base's.
    base_params = run.load(base, lm.FAMILY).state.params
    tuned = run.load(tmp_path / "sft", sft.FAMILY)
    assert tuned.step == 8
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), base_params,
                         tuned.state.params)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0
    assert (tmp_path / "sft" / "tokenizer.model").is_file()
    # Re-running resumes (nothing left to do) rather than starting from the base again.
    assert script.main(argv) == 0


def test_sft_bad_input_is_one_clear_error(stdlib_lm, tmp_path, capsys, load_script):
    base, _ = stdlib_lm
    script = load_script("experiments/sft.py")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": ""}) + "\n")
    common = ["--workdir", str(tmp_path / "w"), "--preset", "tiny"]
    assert script.main([*common, "--base", str(base), "--data", str(bad)]) == 2
    assert "bad.jsonl:1: field 'response' is empty" in capsys.readouterr().err
    assert script.main([*common, "--base", str(tmp_path / "nothing"), "--data", str(bad)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    assert script.main([*common, "--base", str(base), "--data", str(good),
                        "--set", "model.d_model=64"]) == 2  # fmt: skip
    assert "the model is the base run's" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fine_tune_joins_a_cluster_before_reading_its_base(stdlib_lm, tmp_path):
    """Making the config reads the base run's checkpoint, which starts JAX; a cluster is
    joined only before that (a process of one here, through --coordinator)."""
    import socket
    import subprocess
    import sys

    base, _ = stdlib_lm
    data = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"def f{i}():", "response": f"    return {i}"} for i in range(8)]
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "experiments" / "sft.py"), "--workdir", str(tmp_path / "w"),
           "--base", str(base), "--data", str(data), "--preset", "tiny", "--set", "run.steps=1",
           "data.seq_len=32", "data.global_batch_size=8", "data.val_fraction=0",
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "1",
           "--process-id", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run.load(tmp_path / "w", sft.FAMILY).step == 1
