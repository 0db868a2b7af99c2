"""Sample from a trained language model, streaming the completion to stdout.

    python experiments/lm_sample.py --workdir runs/lm --prompt "def fibonacci(n):" \
        --max-new-tokens 120 --temperature 0.8 --top-p 0.95 --seed 0

    python experiments/lm_sample.py --workdir runs/lm --prompts-file prompts.txt --num-samples 4

One prompt and one sample stream token by token. Several prompts (one per
line of --prompts-file; write "\\n" for a newline inside a prompt) or several
samples decode together as one batch and print as blocks headed
``### prompt P, sample S``. Temperature 0 (the default) is greedy. The newest
checkpoint of --workdir is loaded (written by experiments/lm_pretrain.py or
by ``python -m genjax.interop.hf import``). Hardware: any; on a 2-core CPU the
cpu-small model compiles in a few seconds and then makes hundreds of tokens/s.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax

from genjax import lm, run
from genjax import mesh as meshlib
from genjax.models import transformer
from genjax.sampling import SamplingParams, generate_text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a run directory with checkpoints")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompts-file", type=pathlib.Path, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="row r of the batch samples with seed + r")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--mesh", default=None, help="decode sharded, e.g. fsdp=4,tensor=2")
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="split the CPU into N XLA devices; with --mesh tensor=N a batch decodes in "
        "parallel over them (a single prompt still runs on one device's cores)",
    )
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if not args.prompts_file.is_file():
        raise ValueError(f"--prompts-file {args.prompts_file} does not exist")
    try:
        # Lines end at "\n" (and "\r\n") only: str.splitlines would also cut a prompt at
        # a form feed or U+2028.
        text = args.prompts_file.read_text(encoding="utf-8")
        lines = [line.removesuffix("\r") for line in text.split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {args.prompts_file} has no non-empty line")
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.cpu_devices is not None:
            meshlib.split_cpu(args.cpu_devices)
        prompts = read_prompts(args)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
        with run.one_line_warnings():
            loaded = lm.load(args.workdir)
        cfg, params, tokenizer, step = (
            loaded.cfg.model,
            loaded.params,
            loaded.tokenizer,
            loaded.step,
        )
        mesh = None
        if args.mesh:
            mesh = meshlib.make_mesh(args.mesh)
            axes = transformer.param_axes(cfg)
            shardings = meshlib.tree_shardings(axes, params, mesh, transformer.RULES)
            params = jax.device_put(params, shardings)
    except run.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [p for p in prompts for _ in range(args.num_samples)]
    streaming = len(rows) == 1
    if streaming:
        sys.stdout.write(rows[0])
        sys.stdout.flush()

    def on_text(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        texts = generate_text(
            cfg,
            params,
            tokenizer,
            rows,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            seed=args.seed,
            stop=args.stop,
            on_text=on_text if streaming else None,
            mesh=mesh,
        )
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    if streaming:
        sys.stdout.write("\n")
    else:
        for r, (prompt, text) in enumerate(zip(rows, texts, strict=True)):
            print(f"### prompt {r // args.num_samples}, sample {r % args.num_samples}")
            print(prompt + text)
    print(
        f"[checkpoint step {step}, {len(rows)} rows, {seconds:.1f}s including compile]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
