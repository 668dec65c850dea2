"""Deterministic GSM8K-style word problems written from everyday templates.

Each problem is a chain: a start amount, then 1 to 4 operations (+, -, *, /) told as events
of a short story (apples picked, passengers leaving a train, money spent...). Level 1 has one
operation, level 2 two, level 3 three or four. All values stay small positive integers and
divisions are exact.

A record has GSM8K's keys, "question" and "answer" (a worked solution, one line per step,
ending "#### N"), plus the structure it was written from, so its answer can be recomputed:
"level", "theme", "start" and "steps" ([{"op": "+", "value": 5}, ...]).

    python -m telltale_norm.tasks.word_problems --n 600 --seed 0 --out problems.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LEVELS", "apply_op", "generate", "solve", "write_jsonl"]

LEVELS = (1, 2, 3)
MAX_VALUE = 200  # keeps every intermediate result small enough to work out by hand

NAMES = (
    ("Maria", "she", "her"), ("Tom", "he", "his"), ("Aisha", "she", "her"),
    ("Ken", "he", "his"), ("Lena", "she", "her"), ("Omar", "he", "his"),
    ("Sofia", "she", "her"), ("Ben", "he", "his"), ("Priya", "she", "her"),
    ("Leo", "he", "his"), ("Grace", "she", "her"), ("Sam", "he", "his"),
)
TIMES = {2: "twice", 3: "three times", 4: "four times"}
GROWS = {2: "doubles", 3: "triples", 4: "quadruples"}


@dataclass(frozen=True)
class Theme:
    """One story: how it starts, a sentence per operation, the question, the unit.

    Sentences are format strings over {name} {he} {him} {his} {He} {His}, the start amount
    {a} and the operand {k} ({times}, {grows}: its word for * ); an operation without
    sentences is never drawn for this theme.
    """

    name: str
    unit: str
    start: tuple[str, ...]
    ops: dict[str, tuple[str, ...]]
    question: str


THEMES = (
    Theme("apples", "apples",
          ("{name} has {a} apples.", "{name} picks {a} apples from a tree."),
          {"+": ("{He} picks {k} more apples.", "{His} neighbour gives {him} {k} apples."),
           "-": ("{He} eats {k} of the apples.", "{He} gives {k} apples to a friend."),
           "*": ("By the end of the week {he} has {times} as many apples as that.",),
           "/": ("{He} shares the apples equally among {k} baskets and keeps one basket.",)},
          "How many apples does {name} have now?"),
    Theme("money", "dollars",
          ("{name} has ${a}.", "{name} has saved {a} dollars."),
          {"+": ("{He} earns {k} more dollars washing cars.", "{His} aunt gives {him} ${k}."),
           "-": ("{He} spends ${k} on a book.", "{He} pays {k} dollars for lunch."),
           "*": ("{His} savings then {grows}.",),
           "/": ("{He} splits {his} money equally into {k} envelopes and keeps one envelope.",)},
          "How many dollars does {name} have now?"),
    Theme("train", "passengers",
          ("A train leaves the first station with {a} passengers.",
           "There are {a} passengers on a train."),
          {"+": ("At the next stop {k} passengers get on.",
                 "Then {k} more people board the train."),
           "-": ("At the next stop {k} passengers get off.", "Then {k} people leave the train."),
           "*": ("At the busy central station the number of passengers {grows}.",),
           "/": ()},
          "How many passengers are on the train now?"),
    Theme("marbles", "marbles",
          ("{name} has {a} marbles.", "{name} keeps {a} marbles in a jar."),
          {"+": ("{He} wins {k} marbles in a game.", "{He} finds {k} more marbles."),
           "-": ("{He} loses {k} marbles.", "{He} trades away {k} marbles."),
           "*": ("{His} brother gives {him} enough marbles to have {times} as many.",),
           "/": ("{He} divides {his} marbles equally among {k} friends, keeping one share "
                 "for {him}self and giving the rest away.",)},
          "How many marbles does {name} have now?"),
    Theme("cookies", "cookies",
          ("{name} bakes {a} cookies.", "There are {a} cookies on {name}'s plate."),
          {"+": ("{He} bakes {k} more cookies.", "A friend brings {k} cookies."),
           "-": ("{He} eats {k} cookies.", "{His} family eats {k} of the cookies."),
           "*": ("{He} bakes more batches, so {he} has {times} as many cookies.",),
           "/": ("{He} packs the cookies equally into {k} boxes and keeps one box.",)},
          "How many cookies does {name} have now?"),
    Theme("books", "books",
          ("{name} has {a} books on a shelf.", "A small library lends {name} {a} books."),
          {"+": ("{He} buys {k} more books.", "{He} receives {k} books as a gift."),
           "-": ("{He} gives {k} books to a school.", "{He} returns {k} books."),
           "*": ("Over the year {his} collection {grows}.",),
           "/": ("{He} splits the books equally into {k} piles and keeps one pile.",)},
          "How many books does {name} have now?"),
    Theme("bus", "people",
          ("A bus starts its route with {a} people on board.",
           "{a} people are sitting on a bus."),
          {"+": ("At the school {k} people get on.", "At the market {k} more people get on."),
           "-": ("At the park {k} people get off.", "At the station {k} people get off."),
           "*": ("After the concert the number of people on the bus {grows}.",),
           "/": ()},
          "How many people are on the bus now?"),
    Theme("pencils", "pencils",
          ("{name} has {a} pencils.", "{name}'s pencil case holds {a} pencils."),
          {"+": ("{He} buys {k} more pencils.", "{His} teacher gives {him} {k} pencils."),
           "-": ("{He} loses {k} pencils.", "{He} lends {k} pencils to classmates."),
           "*": ("{He} buys packs until {he} has {times} as many pencils.",),
           "/": ("{He} shares the pencils equally with friends so that {k} people have the "
                 "same number, {him}self included.",)},
          "How many pencils does {name} have now?"),
    Theme("stickers", "stickers",
          ("{name} collects {a} stickers.", "{name} has {a} stickers in an album."),
          {"+": ("{He} gets {k} stickers at school.", "{He} swaps for {k} new stickers."),
           "-": ("{He} gives {k} stickers to {his} sister.", "{He} uses {k} stickers on a card."),
           "*": ("{His} collection {grows} over the summer.",),
           "/": ("{He} splits the stickers equally into {k} albums and keeps one album.",)},
          "How many stickers does {name} have now?"),
    Theme("eggs", "eggs",
          ("A farmer collects {a} eggs.", "There are {a} eggs in the farm shop."),
          {"+": ("The hens lay {k} more eggs.", "The farmer collects {k} more eggs."),
           "-": ("{k} eggs are sold.", "{k} eggs break."),
           "*": ("By the weekend the number of eggs {grows}.",),
           "/": ("The eggs are packed equally into {k} cartons and one carton is kept.",)},
          "How many eggs are there now?"),
)

# The worked solution names each step before its arithmetic: "Adding 5: 12 + 5 = 17."
SOLUTION_VERB = {"+": "Adding {k}", "-": "Taking away {k}", "*": "Multiplying by {k}",
                 "/": "Dividing by {k}"}


def apply_op(value: int, op: str, k: int) -> int:
    """One step of a problem's chain (division is exact in every generated problem)."""
    if op == "+":
        return value + k
    if op == "-":
        return value - k
    if op == "*":
        return value * k
    if op == "/":
        if value % k:
            raise ValueError(f"{value} / {k} is not exact")
        return value // k
    raise ValueError(f"unknown operation {op!r}")


def solve(record: dict[str, Any]) -> int:
    """The answer of a generated record, recomputed from its "start" and "steps"."""
    value = record["start"]
    for step in record["steps"]:
        value = apply_op(value, step["op"], step["value"])
    return value


def _draw_step(rng: random.Random, value: int, theme: Theme) -> tuple[str, int] | None:
    """An operation and operand that keep the chain small, positive and exact, or None."""
    allowed = [op for op, sentences in theme.ops.items() if sentences]
    op = rng.choice(allowed)
    # Operands of + and - start at 2, so no story says "1 apples".
    if op == "+":
        return (op, rng.randint(2, min(20, MAX_VALUE - value))) if value <= MAX_VALUE - 2 else None
    if op == "-":
        return (op, rng.randint(2, min(20, value - 1))) if value > 2 else None
    if op == "*":
        factors = [k for k in TIMES if value * k <= MAX_VALUE]
        return (op, rng.choice(factors)) if factors else None
    divisors = [k for k in (2, 3, 4, 5) if value % k == 0]
    return (op, rng.choice(divisors)) if divisors else None


def _problem(rng: random.Random, level: int) -> dict[str, Any]:
    theme = rng.choice(THEMES)
    name, he, his = rng.choice(NAMES)
    words = {"name": name, "he": he, "his": his, "him": "her" if he == "she" else "him",
             "He": he.capitalize(), "His": his.capitalize()}
    n_steps = level if level < 3 else rng.choice((3, 4))
    start = rng.randint(2, 30)
    steps: list[tuple[str, int]] = []
    value = start
    while len(steps) < n_steps:
        drawn = _draw_step(rng, value, theme)
        if drawn is None:
            continue
        steps.append(drawn)
        value = apply_op(value, *drawn)

    sentences = [rng.choice(theme.start).format(a=start, **words)]
    lines = [f"At the start there are {start} {theme.unit}."]
    prev = start
    for op, k in steps:
        new = apply_op(prev, op, k)
        sentences.append(rng.choice(theme.ops[op]).format(
            k=k, times=TIMES.get(k, ""), grows=GROWS.get(k, ""), **words))
        lines.append(f"{SOLUTION_VERB[op].format(k=k)}: {prev} {op} {k} = {new}.")
        prev = new
    sentences.append(theme.question.format(**words))
    lines.append(f"The answer is {prev}.\n#### {prev}")
    return {
        "question": " ".join(sentences),
        "answer": "\n".join(lines),
        "level": level,
        "theme": theme.name,
        "start": start,
        "steps": [{"op": op, "value": k} for op, k in steps],
    }


def generate(n: int, seed: int = 0, levels: Sequence[int] = LEVELS) -> list[dict[str, Any]]:
    """`n` distinct problems, levels taken in turn from `levels`; the same list for the same
    arguments on every machine (only Python's seeded `random.Random` is used)."""
    bad = [level for level in levels if level not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {tuple(levels)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        problem = _problem(rng, levels[len(out) % len(levels)])
        if problem["question"] not in seen:  # level 1 has few distinct stories: no repeats
            seen.add(problem["question"])
            out.append(problem)
    return out


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m telltale_norm.tasks.word_problems",
        description="Write deterministic GSM8K-format word problems as JSONL.")
    parser.add_argument("--n", type=int, default=600, help="number of problems (600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--levels", default="1,2,3",
                        help="comma-separated difficulty levels: 1, 2 or 3 (3-4 steps)")
    parser.add_argument("--out", default="-", help="output .jsonl file ('-': stdout)")
    args = parser.parse_args(argv)
    levels = tuple(int(part) for part in args.levels.split(","))
    records = generate(args.n, args.seed, levels)
    if args.out == "-":
        for record in records:
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        print(write_jsonl(records, args.out))


if __name__ == "__main__":
    main()
