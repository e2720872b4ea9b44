"""EvalPlus' extra tests: loading its files, and the differential test run in the real sandbox."""

from __future__ import annotations

import json

import pytest

from pipeline.config import BenchmarkConfig, ConfigError, SandboxConfig
from pipeline.evaluate import benchmarks
from pipeline.evaluate.plus import load_plus_problems, mbpp_deserialize_inputs
from pipeline.evaluate.plus_harness import matches
from pipeline.evaluate.sandbox import run_program

SANDBOX = SandboxConfig(timeout_s=30)

ADJACENT_ONLY = """
    return any(abs(a - b) < threshold for a, b in zip(numbers, numbers[1:]))
"""  # HumanEval/0 without sorting: right on the base inputs, wrong on [1.0, 5.0, 1.1]
ROUNDED = "    return round(number % 1.0, 3)\n"  # HumanEval/2: within 1e-6 on the base inputs, not on 1.2345
NEWTON = """
    x = 10.0
    for _ in range(200):
        f = sum(c * x ** i for i, c in enumerate(xs))
        d = sum(i * c * x ** (i - 1) for i, c in enumerate(xs) if i)
        x -= f / d
    return x
"""  # HumanEval/32: another root than the canonical bisection finds, which the special oracle accepts
SLOW = "    import time\n    time.sleep(3)\n    return False\n"


def verdicts(problem, completion: str) -> tuple[str, str]:
    """(base reason, plus reason) of a completion, each suite run as its own sandboxed program."""
    code = benchmarks.solution(problem, completion)
    base = run_program(benchmarks.program(problem, code), SANDBOX)
    plus = run_program(benchmarks.program(problem, code, "plus_test"), SANDBOX)
    return base.reason, plus.reason


@pytest.fixture(scope="module")
def humaneval_plus(evalplus_files):
    cfg = BenchmarkConfig(name="humaneval", plus_path=str(evalplus_files["humaneval"]), plus_min_time_limit_s=0.5)
    return {p.task_id: p for p in load_plus_problems(cfg)}


def test_loads_the_files_problems_in_order_with_both_suites(humaneval_plus, evalplus_files):
    assert list(humaneval_plus) == ["HumanEval/0", "HumanEval/2", "HumanEval/32"]
    p = humaneval_plus["HumanEval/0"]
    assert p.entry_point == "has_close_elements" and p.answer_start.endswith(p.prompt.rstrip()) and p.prompt in p.problem
    assert "namespace['run'](globals()" in p.test and p.plus_test and p.test != p.plus_test
    cfg = BenchmarkConfig(name="humaneval", plus_path=str(evalplus_files["humaneval"]), limit=2)
    assert [q.task_id for q in load_plus_problems(cfg)] == ["HumanEval/0", "HumanEval/2"]


def test_canonical_solutions_pass_and_empty_completions_fail(humaneval_plus):
    for p in humaneval_plus.values():
        assert verdicts(p, p.reference) == ("passed", "passed"), p.task_id
        base, plus = verdicts(p, "")
        assert base != "passed" and plus != "passed", p.task_id


@pytest.mark.parametrize("task, body, expected", [
    ("HumanEval/0", ADJACENT_ONLY, ("passed", "assertion")),
    ("HumanEval/2", ROUNDED, ("passed", "assertion")),  # float outputs compare within atol 1e-6, not exactly
    ("HumanEval/32", NEWTON, ("passed", "passed")),
    ("HumanEval/0", SLOW, ("timeout", "timeout")),  # the per-input limit, long before the program's
])
def test_differential_verdicts(humaneval_plus, task, body, expected):
    # The model writes the newline that ends the prompt's docstring first (see benchmarks.continued).
    assert verdicts(humaneval_plus[task], "\n" + body.lstrip("\n")) == expected


def test_a_solution_without_the_entry_point_is_an_error(humaneval_plus):
    p = humaneval_plus["HumanEval/2"]
    program = f"def other(x):\n    return x\n\n\n{p.test}"
    outcome = run_program(program, SANDBOX)
    assert outcome.reason == "error" and "truncate_number" in outcome.detail


def test_mbpp_plus_inputs_are_tuples_again_and_outputs_compare_as_sets(evalplus_files):
    [p] = load_plus_problems(BenchmarkConfig(name="mbpp", plus_path=str(evalplus_files["mbpp"])))
    assert (p.task_id, p.prompt, p.answer_start) == ("Mbpp/2", "", "```python\n")
    assert p.problem.startswith('"""') and "similar_elements" in p.problem
    assert verdicts(p, p.reference) == ("passed", "passed")
    tuples_only = ("def similar_elements(a, b):\n    assert isinstance(a, tuple) and isinstance(b, tuple)\n"
                   "    return tuple(sorted(set(a) & set(b), reverse=True))\n")  # another order: still the same set
    assert verdicts(p, tuples_only) == ("passed", "passed")
    assert verdicts(p, "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n")[0] == "assertion"


def test_mbpp_deserialization_follows_evalplus():
    assert mbpp_deserialize_inputs("Mbpp/124", [["1.5", "1+2j"]]) == [(1.5, 1 + 2j)]
    # as evalplus: an item that is not a non-empty list becomes {} (an empty dict, evalplus' spelling of "empty")
    assert mbpp_deserialize_inputs("Mbpp/115", [[[[1, 2], [], 3]]]) == [[[{1, 2}, {}, {}]]]
    assert mbpp_deserialize_inputs("Mbpp/259", [[[[1, 2]], [[3]]]]) == [[((1, 2),), ((3,),)]]
    assert mbpp_deserialize_inputs("Mbpp/580", [[[1, [2, [3]]]]]) == [(((1, (2, (3,))),))]
    assert mbpp_deserialize_inputs("Mbpp/11", [["hello", "l"]]) == [["hello", "l"]]


@pytest.mark.parametrize("dataset, entry, inp, out, exp, atol, verdict", [
    ("humaneval", "f", [], 3, 3, 0, (True, 0)),
    ("humaneval", "f", [], 0.1 + 0.2, 0.3, 0, (True, 1e-6)),  # atol 0 becomes 1e-6 for float outputs ...
    ("humaneval", "f", [], 2, 1, 1e-6, (False, 1e-6)),  # ... and stays for the rest of the suite
    ("humaneval", "f", [], 1, 1.0000001, 0, (False, 1e-6)),  # close, but an int where a float is expected
    ("humaneval", "f", [], [1.0, float("nan")], [1.0, float("nan")], 0, (False, 1e-6)),  # NaN is never close
    ("humaneval", "f", [], [1.0, 2.0], [1.0, 2.0000000001], 0, (True, 1e-6)),
    ("humaneval", "f", [], "a", "b", 0, (False, 0)),
    ("humaneval", "f", [], None, [1.0], 0, (False, 1e-6)),
    ("mbpp", "similar_elements", [], (5, 4), (4, 5), 0, (True, 0)),
    ("mbpp", "check_str", [], "match", True, 0, (True, 0)),  # any non-None output stands for True
    ("mbpp", "check_str", [], None, True, 0, (False, 0)),
    ("mbpp", "sum_div", [], 0, 7, 0, (True, 0)),
    ("mbpp", "are_equivalent", [], "anything", False, 0, (True, 0)),
])
def test_comparison_rules(dataset, entry, inp, out, exp, atol, verdict):
    assert matches(dataset, entry, inp, out, exp, atol) == verdict


def test_bad_files_are_config_errors_naming_the_field(tmp_path, evalplus_files):
    def error(name: str, path) -> str:
        with pytest.raises(ConfigError) as err:
            load_plus_problems(BenchmarkConfig(name=name, plus_path=str(path)))
        assert str(err.value).startswith("benchmark.plus_path: ")
        return str(err.value)

    assert "cannot read" in error("humaneval", tmp_path / "missing.jsonl")
    assert "'Mbpp/2', not a HumanEval/* task" in error("humaneval", evalplus_files["mbpp"])
    (tmp_path / "partial.jsonl").write_text(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
    missing = "lacks entry_point, canonical_solution, base_input, plus_input"
    assert missing in error("humaneval", tmp_path / "partial.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"task_id": \n')
    assert "line 1 is not JSON" in error("humaneval", tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "holds no tasks" in error("mbpp", tmp_path / "empty.jsonl")
