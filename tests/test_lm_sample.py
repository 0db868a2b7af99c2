"""Text generation (genjax.sampling.text) and the sampling CLI on a real trained run."""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

from genjax import lm
from genjax import run as runlib
from genjax.models import transformer
from genjax.sampling import SamplingParams, generate_text

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (three-step) run on the stdlib's json package: (workdir, cfg, params, tokenizer)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    corpus = tuple(str(p) for p in sorted((stdlib / "json").glob("*.py")))
    cfg = lm.PretrainConfig(
        model=dataclasses.replace(transformer.get_preset("tiny"), vocab_size=384),
        data=lm.DataConfig(corpus=corpus, val_fraction=0.0, seq_len=32, global_batch_size=8),
        run=runlib.RunConfig(steps=3),
    )
    workdir = tmp_path_factory.mktemp("run")
    runlib.train(cfg, workdir, lm.FAMILY)
    loaded = lm.load(workdir)
    return workdir, loaded.cfg.model, loaded.params, loaded.tokenizer


SAMPLING = SamplingParams(temperature=1.0, top_p=0.95)


def test_streamed_text_equals_returned_text_and_stop_strings_cut(run):
    _, cfg, params, tok = run
    prompts = ["def loads(s):\n", "import "]
    kw = dict(max_new_tokens=24, sampling=SAMPLING, seed=1)
    free = generate_text(cfg, params, tok, prompts, **kw)
    assert all(len(t) > 4 for t in free)
    stop = free[0][2:4]  # a stop string the model really produces
    pieces = {0: [], 1: []}
    cut = generate_text(
        cfg, params, tok, prompts, stop=[stop], on_text=lambda r, p: pieces[r].append(p), **kw
    )
    assert cut[0] == free[0][: free[0].index(stop)]
    assert stop not in cut[1]
    assert cut[1] == free[1][: len(cut[1])]
    for row in (0, 1):
        assert "".join(pieces[row]) == cut[row]


def test_cli_streams_one_prompt(run, capsys, load_script):
    workdir, cfg, params, tok = run
    prompt = "class Decoder:"
    code = load_script("experiments/lm_sample.py").main(
        ["--workdir", str(workdir), "--prompt", prompt, "--max-new-tokens", "20"]
    )
    assert code == 0
    [expected] = generate_text(cfg, params, tok, [prompt], max_new_tokens=20)
    assert capsys.readouterr().out == prompt + expected + "\n"


def test_cli_batch_from_prompts_file(run, tmp_path, capsys, load_script):
    workdir = run[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def a():\\n    return\nimport json\n\n")
    args = ["--workdir", str(workdir), "--prompts-file", str(prompts), "--num-samples", "2"]
    args += ["--max-new-tokens", "16"]
    code = load_script("experiments/lm_sample.py").main(
        [*args, "--temperature", "0.9", "--top-k", "20", "--seed", "3"]
    )
    out = capsys.readouterr().out
    assert code == 0
    headers = [line for line in out.splitlines() if line.startswith("### ")]
    assert headers == [f"### prompt {p}, sample {s}" for p in (0, 1) for s in (0, 1)]
    assert "def a():\n    return" in out


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--prompt", "x", "--max-new-tokens", "100"], "exceeds the model's context of 64"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompts-file", "/nonexistent.txt"], "does not exist"),
        (["--prompt", "x"], "max_new_tokens=120 that exceeds"),
        (["--prompt", "x", "--num-samples", "0"], "num-samples"),
        (["--prompt", "x", "--cpu-devices", "2"], "before JAX starts"),
        (["--prompt", "x", "--cpu-devices", "0"], "cpu-devices=0 must be >= 1"),
    ],
)
def test_cli_bad_input_is_a_clear_error(run, capsys, extra, match, load_script):
    code = load_script("experiments/lm_sample.py").main(["--workdir", str(run[0]), *extra])
    assert code == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_batch_over_two_cpu_devices_equals_one_device(run, tmp_path):
    # A fresh process: the CPU is split into two devices before JAX starts.
    workdir = run[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def a():\n    return\nimport json\n")
    args = [sys.executable, str(ROOT / "experiments/lm_sample.py"), "--workdir", str(workdir)]
    args += ["--prompts-file", str(prompts), "--max-new-tokens", "12"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8 fake devices
    one = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    two = subprocess.run(
        [*args, "--cpu-devices", "2", "--mesh", "tensor=2"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert two.stdout == one.stdout and "### prompt 1" in one.stdout


def test_cli_prompts_file_not_utf8(run, tmp_path, capsys, load_script):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"def f():\xff\n")
    code = load_script("experiments/lm_sample.py").main(
        ["--workdir", str(run[0]), "--prompts-file", str(bad)]
    )
    assert code == 2
    assert "cannot read --prompts-file" in capsys.readouterr().err


def test_cli_without_checkpoint(tmp_path, capsys, load_script):
    code = load_script("experiments/lm_sample.py").main(
        ["--workdir", str(tmp_path), "--prompt", "x"]
    )
    assert code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_prompts_file_is_split_at_newlines_only(tmp_path, load_script):
    import argparse

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\u2028b\fc\r\nd\\ne\n\n", encoding="utf-8")
    args = argparse.Namespace(prompt=None, prompts_file=prompts)
    assert load_script("experiments/lm_sample.py").read_prompts(args) == ["a\u2028b\fc", "d\ne"]
