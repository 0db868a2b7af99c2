"""The Python task of RLHF: complete a function from its signature and docstring, with
a programmatic gold reward, whether the completed function parses (``ast.parse``).

Prompts and reference responses come from the standard library's documented functions
(``function_pairs``); preference pairs put a reference body (chosen) against the same
body cut short (rejected) when the two differ in whether they parse.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
import warnings
from collections.abc import Sequence

import numpy as np


def _parse(source: str) -> ast.Module:
    """``ast.parse`` without the warnings some valid text draws (``1if``: "invalid decimal
    literal"; ``"\\("``: "invalid escape sequence", a DeprecationWarning before Python
    3.12): whether it parses is the answer, and sampled text draws them often."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source)


def function_pairs(files, max_prompt_lines: int = 12, max_body_lines: int = 16) -> list[dict]:
    """{"prompt": def line + docstring, "response": body} of the documented functions
    in ``files``, each dedented to column 0, lines ending in newlines."""
    pairs = []
    for path in files:
        try:
            source = pathlib.Path(path).read_text(encoding="utf-8")
            tree = _parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if ast.get_docstring(node) is None or len(node.body) < 2:
                continue
            split = node.body[0].end_lineno  # the docstring's last line
            prompt_lines = lines[node.lineno - 1 : split]
            body_lines = lines[split : node.end_lineno]
            if len(prompt_lines) > max_prompt_lines or not 1 <= len(body_lines) <= max_body_lines:
                continue
            text = textwrap.dedent("\n".join(prompt_lines + body_lines))
            cut = text.splitlines()
            pairs.append({
                "prompt": "\n".join(cut[: len(prompt_lines)]) + "\n",
                "response": "\n".join(cut[len(prompt_lines) :]) + "\n",
            })  # fmt: skip
    return pairs


def parses(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 where ``prompt + response`` is valid Python, else 0.0."""
    rewards = []
    for prompt, response in zip(prompts, responses, strict=True):
        try:
            _parse(prompt + response)
        except (SyntaxError, ValueError):
            rewards.append(0.0)
        else:
            rewards.append(1.0)
    return rewards


def preference_pairs(pairs: Sequence[dict], seed: int = 0) -> list[dict[str, str]]:
    """{"prompt", "chosen", "rejected"}: each reference body that parses against itself cut
    at a random character, kept where the cut one does not parse."""
    rng = np.random.default_rng(seed)
    out = []
    for p in pairs:
        body = p["response"]
        if len(body) < 4 or not parses([p["prompt"]], [body])[0]:
            continue
        cut = body[: int(rng.integers(1, len(body) - 1))]
        if cut.strip() and not parses([p["prompt"]], [cut])[0]:
            out.append({"prompt": p["prompt"], "chosen": body, "rejected": cut})
    return out
