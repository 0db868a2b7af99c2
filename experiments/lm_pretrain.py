"""Pre-train a Llama-style language model on Python source.

Command (the README's main job; resumes when re-run with the same --workdir):

    python experiments/lm_pretrain.py --workdir runs/lm

Hardware and time: with no flags but --workdir it trains the ``cpu-small``
preset (12.2M parameters, the BENCHMARKS.md configuration) on the Python
standard library of this machine for 400 steps of 16 × 256 tokens — about
11–20 minutes on a 2-core CPU — then prints validation bits per byte and a short
greedy sample. Expected: about 1.75 validation bits/byte (measured numbers in
experiments/benchmarks/RESULTS.md).

Local smoke run (seconds):

    python experiments/lm_pretrain.py --workdir /tmp/lm --preset tiny --steps 20 \
        --set data.seq_len=64 data.global_batch_size=8

Any config field can be overridden with ``--set section.field=value``
(sections: model, optim, data, run); see genjax/lm.py for every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax

from genjax import config as configlib
from genjax import lm, train
from genjax import mesh as meshlib
from genjax.models import transformer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="checkpoints, logs and tokenizer go here")
    p.add_argument(
        "--preset", default="cpu-small", help=f"model preset: {sorted(transformer.PRESETS)}"
    )
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (one axis may be -1)")
    p.add_argument(
        "--corpus", nargs="+", help="files or folders to train on (default: Python stdlib)"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. optim.lr=1e-3 model.num_layers=4",
    )
    p.add_argument("--sample-tokens", type=int, default=120, help="tokens of the final sample")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (TPU VM slice, SLURM: found from the environment)",
    )
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for a hand-made cluster")
    p.add_argument("--num-processes", type=int, help="processes in a hand-made cluster")
    p.add_argument("--process-id", type=int, help="this process's index in a hand-made cluster")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> lm.PretrainConfig:
    # Peak LR 1e-3: at 400 steps it reached 1.750 validation bits/byte against
    # 1.871 at 3e-4 (experiments/benchmarks/RESULTS.md).
    cfg = lm.PretrainConfig(
        model=transformer.get_preset(args.preset), optim=train.OptimConfig(lr=1e-3)
    )
    flags = []
    if args.steps is not None:
        flags.append(f"run.steps={args.steps}")
    if args.checkpoint_every is not None:
        flags.append(f"run.checkpoint_every={args.checkpoint_every}")
    if args.mesh:
        flags.append(f"run.mesh={args.mesh}")
    if args.corpus:
        flags.append(f"data.corpus={tuple(args.corpus)!r}")
    cfg = configlib.override(cfg, [*flags, *args.set])
    # The schedule spans the run (warm-up at most a tenth of it) unless set explicitly.
    explicit = {a.split("=", 1)[0] for a in args.set}
    optim = cfg.optim
    if "optim.total_steps" not in explicit:
        optim = dataclasses.replace(optim, total_steps=cfg.run.steps)
    if "optim.warmup_steps" not in explicit:
        optim = dataclasses.replace(
            optim, warmup_steps=min(optim.warmup_steps, max(cfg.run.steps // 10, 1))
        )
    cfg = dataclasses.replace(cfg, optim=optim)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.distributed or args.coordinator:
        meshlib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        summary = lm.pretrain(cfg, args.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Bad config, mesh, corpus or checkpoint, or a diverged run: a message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["stopped_by"]:
        return 0
    if "val_bits_per_byte" in summary:
        print(f"validation bits/byte: {summary['val_bits_per_byte']:.4f}")
    if args.sample_tokens and jax.process_count() == 1:
        from genjax.sampling import generate_text

        prompt = "def fibonacci(n):\n"
        max_new = min(args.sample_tokens, cfg.model.max_seq_len // 2)
        [text] = generate_text(
            cfg.model,
            summary["state"].params,
            summary["tokenizer"],
            [prompt],
            max_new_tokens=max_new,
        )
        print(f"sample (greedy):\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
