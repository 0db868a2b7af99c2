"""The Python task of RLHF: complete a function from its signature and docstring, with
a programmatic gold reward, whether the completed function parses (``ast.parse``) with a
body that is no stub (``writes_a_body``).

Prompts and reference responses come from the standard library's documented functions
(``function_pairs``). Preference pairs are labelled by the gold reward on the policy's
own samples (``preference_pairs``), as a labeller would rank a model's answers.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
import warnings
from collections.abc import Sequence


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


def _is_stub(statement: ast.stmt) -> bool:
    """``pass``, ``...``, a bare string (a docstring) or ``raise NotImplementedError``."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr):
        return isinstance(statement.value, ast.Constant)
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def writes_a_body(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The gold reward: 1.0 where ``prompt + response`` parses and the function the prompt
    opens has a statement that is no stub (its docstring, ``pass``, ``...``, ``raise
    NotImplementedError``), else 0.0.

    Parsing alone is no task here: a signature and docstring parse already, so a policy
    rewarded for parsing learns to end the function at once; one rewarded for any
    statement learns the stub ``raise NotImplementedError``."""
    rewards = []
    for prompt, response in zip(prompts, responses, strict=True):
        try:
            module = _parse(prompt + response)
        except (SyntaxError, ValueError):
            rewards.append(0.0)
            continue
        function = module.body[0] if module.body else None  # the prompt's def line opens it
        is_function = isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        rewards.append(float(is_function and not all(map(_is_stub, function.body))))
    return rewards


def preference_pairs(
    prompts: Sequence[str], samples: Sequence[Sequence[str]], references: Sequence[str]
) -> list[dict[str, str]]:
    """{"prompt", "chosen", "rejected"} for each prompt with a sample the gold reward
    rejects: that sample against one it accepts, or against the reference body where no
    sample is accepted (so a weak policy still gets pairs). Prompts whose samples all pass
    give no pair; empty answers are left out (a preference file has no empty response)."""
    out = []
    for prompt, responses, reference in zip(prompts, samples, references, strict=True):
        gold = writes_a_body([prompt] * len(responses), responses)
        failed = [r for r, g in zip(responses, gold, strict=True) if not g and r.strip()]
        passed = [r for r, g in zip(responses, gold, strict=True) if g]
        if failed and (passed or writes_a_body([prompt], [reference])[0]):
            out.append({"prompt": prompt, "chosen": (passed or [reference])[0],
                        "rejected": failed[0]})  # fmt: skip
    return out
