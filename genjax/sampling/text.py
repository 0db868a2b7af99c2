"""Text in, text out: prompts through the tokenizer, decoding, streamed text back.

    texts = generate_text(cfg, params, tokenizer, ["def add(a, b):\n"], max_new_tokens=64,
                          sampling=SamplingParams(temperature=0.8, top_p=0.95),
                          stop=["\n\n"], on_text=lambda i, piece: print(piece, end=""))

Each prompt starts with the end-of-document token, as every document did in
training. A stop string ends its row in the compiled loop when the tokenizer
spells it as the same tokens the model produced, and the text is always cut
at its first occurrence; when the model spells it differently, the row runs on
to max_new_tokens (or end-of-document) and is cut afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from genjax.models import transformer
from genjax.sampling.decode import GREEDY, SamplingParams, generate
from genjax.tokenizer import Tokenizer


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class _TextStream:
    """Turns streamed token ids into text pieces, per row.

    A piece is released only when it is final: the decoded text must not end
    in an incomplete UTF-8 sequence (byte-fallback tokens), and the part that
    could still become a stop string is held back.
    """

    def __init__(self, tokenizer: Tokenizer, rows: int, stop: Sequence[str], on_text):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows  # characters already released
        self.finished = [False] * rows
        self.hold = max((len(s) for s in stop), default=1) - 1

    def on_token(self, step: int, tokens_B: np.ndarray) -> None:
        del step
        for b, token in enumerate(tokens_B.tolist()):
            if token < 0 or self.finished[b]:
                continue
            self.ids[b].append(token)
            text = self.tokenizer.decode(self.ids[b])
            text, stopped = cut_at_stop(text, self.stop)
            if stopped:
                self.finished[b] = True
            elif text.endswith("\ufffd"):
                continue  # wait for the rest of a multi-byte character
            else:
                text = text[: max(len(text) - self.hold, self.sent[b])]
            self._release(b, text)

    def flush(self, texts: Sequence[str]) -> None:
        """Releases what was held back, once each row's final text is known."""
        for b, text in enumerate(texts):
            self._release(b, text)

    def _release(self, b: int, text: str) -> None:
        if len(text) > self.sent[b]:
            self.on_text(b, text[self.sent[b] :])
            self.sent[b] = len(text)


def generate_text(
    cfg: transformer.Config,
    params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    seed: int = 0,
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """The completion of each prompt (without the prompt), cut at the first stop string.

    ``on_text(row, piece)`` receives each row's text as it is produced.
    """
    ids = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in prompts]
    stream = _TextStream(tokenizer, len(prompts), stop, on_text) if on_text else None
    gen = generate(
        cfg,
        params,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        eos_id=tokenizer.eos_id,
        stop_sequences=[tokenizer.encode(s) for s in stop if s],
        on_token=stream.on_token if stream else None,
        mesh=mesh,
    )
    # Tokens come without the stop sequence that ended them; cutting catches the
    # stop strings the model spelled with other tokens.
    texts = [cut_at_stop(tokenizer.decode(new), stop)[0] for new in gen.tokens]
    if stream:
        stream.flush(texts)
    return texts
