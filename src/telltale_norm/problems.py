"""The bundled word problems the demo and `calibrate` run, and how answers are scored.

Pure Python: no engine, no vLLM (`chat_prompts` takes any object with vLLM's
`get_tokenizer()`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INSTRUCTION = ("\nSolve it step by step, then give the final answer on its own line as "
               "'#### <number>'.")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the full worked solution, ending in "#### N"
    expected: float
    level: int


def expected_answer(solution: str) -> float:
    """The number after `####` in a GSM8K-format solution."""
    match = re.search(r"####\s*(-?[\d,]*\.?\d+)", solution)
    if match is None:
        raise ValueError(f"solution has no '#### <number>' line: {solution[-80:]!r}")
    return float(match.group(1).replace(",", ""))


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion (sensible for small n and 0 or n)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def load_problems(n: int, seed: int = 0) -> tuple[list[Problem], str]:
    """`n` bundled word problems, and a line saying what they are."""
    from telltale_norm.tasks.word_problems import generate

    problems = [Problem(d["question"], d["answer"], expected_answer(d["answer"]), d["level"])
                for d in generate(n, seed=seed)]
    return problems, f"{len(problems)} generated word problems (telltale_norm.tasks, seed {seed})"


def chat_prompts(llm: Any, questions: Sequence[str]) -> list[str]:
    """Each question with the answer-format instruction, in the model's chat template."""
    tokenizer = llm.get_tokenizer()
    if not getattr(tokenizer, "chat_template", None):
        return [f"Question: {q}{INSTRUCTION}\nAnswer:" for q in questions]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q + INSTRUCTION}],
                                          tokenize=False, add_generation_prompt=True)
            for q in questions]
