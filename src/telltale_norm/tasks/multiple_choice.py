"""Deterministic 4-option multiple-choice questions: comparisons and small arithmetic.

A record has "question", "choices" (4 strings), "label" (index of the right choice), "kind"
and the numbers it was made from ("numbers" for comparisons; "a", "op", "b" for arithmetic),
so the right answer can be recomputed with `answer_of`. lm-eval scores each choice by its
log-likelihood after "Answer:" (`output_type: multiple_choice`).

    python -m telltale_norm.tasks.multiple_choice --n 300 --seed 0 --out mc.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from typing import Any

from telltale_norm.tasks.word_problems import apply_op, write_jsonl

__all__ = ["KINDS", "answer_of", "generate"]

KINDS = ("largest", "smallest", "+", "-", "*")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def answer_of(record: dict[str, Any]) -> int:
    """The right answer of a record, recomputed from its numbers."""
    if record["kind"] == "largest":
        return max(record["numbers"])
    if record["kind"] == "smallest":
        return min(record["numbers"])
    return apply_op(record["a"], record["op"], record["b"])


def _comparison(rng: random.Random, kind: str) -> dict[str, Any]:
    numbers = rng.sample(range(1, 100), 4)
    return {"question": f"Which number is {kind}: {', '.join(map(str, numbers))}?",
            "numbers": numbers, "choices": [str(x) for x in numbers]}


def _arithmetic(rng: random.Random, op: str) -> dict[str, Any]:
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(10, 60), rng.randint(1, 30)
        if op == "-" and b > a:
            a, b = b, a
    right = apply_op(a, op, b)
    # Near misses, the kind of slip a person makes: off by one, two or ten (or one factor).
    near = {right + 1, right - 1, right + 2, right - 2, right + 10, right - 10}
    if op == "*":
        near |= {a * (b + 1), a * (b - 1)}
    wrong = rng.sample(sorted(x for x in near if x >= 0 and x != right), 3)
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"question": f"What is {a} {_OP_WORDS[op]} {b}?", "a": a, "op": op, "b": b,
            "choices": [str(x) for x in choices]}


def generate(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct questions, kinds taken in turn from `KINDS`; deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        kind = KINDS[len(out) % len(KINDS)]
        if kind in ("largest", "smallest"):
            record = _comparison(rng, kind)
        else:
            record = _arithmetic(rng, kind)
        if record["question"] in seen:
            continue
        seen.add(record["question"])
        record["kind"] = kind
        record["label"] = record["choices"].index(str(answer_of(record)))
        out.append(record)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m telltale_norm.tasks.multiple_choice",
        description="Write deterministic 4-option multiple-choice questions as JSONL.")
    parser.add_argument("--n", type=int, default=300, help="number of questions (300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--out", default="-", help="output .jsonl file ('-': stdout)")
    args = parser.parse_args(argv)
    records = generate(args.n, args.seed)
    if args.out == "-":
        for record in records:
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        print(write_jsonl(records, args.out))


if __name__ == "__main__":
    main()
