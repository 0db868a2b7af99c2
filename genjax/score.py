"""Bits per byte of files under a run's newest checkpoint.

    python -m genjax.score --workdir DIR FILE...

Prints one line per file and, last, ``bits_per_byte=<total>`` over all files
(total negative log2-likelihood ÷ total UTF-8 bytes).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from genjax import lm
from genjax import run as runlib


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Bits per byte of files under a checkpoint.")
    p.add_argument("--workdir", required=True)
    p.add_argument("files", nargs="+", type=pathlib.Path)
    args = p.parse_args(argv)
    texts = []
    for path in args.files:
        try:
            # Bytes as they are on disk: read_text would translate CRLF to LF.
            texts.append(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot score {path}: {e}", file=sys.stderr)
            return 2
    try:
        with runlib.one_line_warnings():
            run = lm.load(args.workdir)
    except runlib.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, tok = run.cfg, run.tokenizer
    total_bits = total_bytes = 0.0
    for path, text in zip(args.files, texts, strict=True):
        scoring = lm.scoring_set(tok, [text], seq_len=cfg.data.seq_len)
        r = lm.bits_per_byte(cfg.model, run.params, scoring)
        total_bits += r["bits"]
        total_bytes += r["bytes"]
        print(f"{path}\t{r['bytes']} bytes\t{r['bits_per_byte']:.4f} bits/byte")
    print(f"checkpoint step {run.step}: {len(texts)} files, {int(total_bytes)} bytes")
    print(f"bits_per_byte={total_bits / max(total_bytes, 1):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
