"""EvalPlus' extra tests (HumanEval+ / MBPP+) from its release files, given by path (`benchmark.plus_path`).

With a file, `evaluate` scores the way EvalPlus does, so that its numbers compare with published ones:
- the problems are the file's (HumanEval+ v0.1.10: 164; MBPP+ v0.2.0: 378), and the model sees the file's
  `prompt` (HumanEval+: the function prompt; MBPP+: the description and first test in a docstring);
- base: the solution's outputs on `base_input` match the canonical solution's; plus (EvalPlus' "base + extra
  tests"): base passes AND the outputs on `plus_input` match too;
- each suite is one sandboxed program: the solution, then plus_harness.py, which computes the expected
  outputs from `canonical_solution`, runs the solution on every input with EvalPlus' per-input time limit
  and compares with EvalPlus' rules (evalplus 0.3.1). One difference: evalplus 0.3.1 never counts
  HumanEval/32 (`find_zero`) as passed (its special oracle skips the bookkeeping of a passed input); here
  a root within `atol` passes, as the oracle intends.

The file is EvalPlus' JSONL (optionally .gz), local or `s3://`: one task per line with `task_id`, `prompt`,
`entry_point`, `canonical_solution`, `base_input`, `plus_input`, `atol`. MBPP+ stores tuples, sets and
complex numbers as JSON lists/strings; they are restored per task as evalplus' `mbpp_deserialize_inputs` does.
"""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import BenchmarkConfig, ConfigError
from pipeline.evaluate.benchmarks import Problem, continued
from pipeline.io import as_uri
from pipeline.prompts import EVAL_ANSWER_START

HARNESS_SOURCE = (Path(__file__).resolve().parent / "plus_harness.py").read_text(encoding="utf-8")
REQUIRED = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")
TASK_PREFIX = {"humaneval": "HumanEval/", "mbpp": "Mbpp/"}


def load_plus_problems(cfg: BenchmarkConfig) -> list[Problem]:
    """The file's problems in file order (the first `cfg.limit`), each with a base and a plus test program."""
    assert cfg.plus_path is not None
    tasks = read_tasks(cfg.plus_path)
    prefix = TASK_PREFIX[cfg.name]
    wrong = [t["task_id"] for t in tasks if not str(t["task_id"]).startswith(prefix)]
    if wrong:
        raise ConfigError(f"benchmark.plus_path: {cfg.plus_path} holds task {wrong[0]!r}, not a {prefix}* task of "
                          f"benchmark.name={cfg.name}")
    tasks = tasks[:cfg.limit] if cfg.limit is not None else tasks
    return [_problem(cfg, t) for t in tasks]


def read_tasks(path: str) -> list[dict[str, Any]]:
    fs, file_path = pafs.FileSystem.from_uri(as_uri(path))
    try:
        with fs.open_input_stream(file_path) as f:  # .gz is decompressed by its suffix
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"benchmark.plus_path: cannot read {path}: {err}") from err
    tasks = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"benchmark.plus_path: {path} line {n} is not JSON: {err}") from err
        missing = [k for k in REQUIRED if k not in task]
        if missing:
            raise ConfigError(f"benchmark.plus_path: {path} line {n} lacks {', '.join(missing)} "
                              f"(not an EvalPlus HumanEval+/MBPP+ file?)")
        tasks.append(task)
    if not tasks:
        raise ConfigError(f"benchmark.plus_path: {path} holds no tasks")
    return tasks


def _problem(cfg: BenchmarkConfig, task: dict[str, Any]) -> Problem:
    task_id, entry_point = task["task_id"], task["entry_point"]
    base, plus = task["base_input"], task["plus_input"]
    if cfg.name == "mbpp":
        base, plus = mbpp_deserialize_inputs(task_id, base), mbpp_deserialize_inputs(task_id, plus)
        problem, answer_start, prompt, cut = task["prompt"].strip(), EVAL_ANSWER_START, "", ""
    else:
        prompt = task["prompt"].lstrip("\n")
        problem, (answer_start, cut) = prompt, continued(prompt)
    canonical = task["prompt"] + task["canonical_solution"]  # as evalplus' get_groundtruth runs it
    common = {"dataset": cfg.name, "entry_point": entry_point, "canonical": canonical,
              "atol": float(task.get("atol") or 0), "min_time_limit": cfg.plus_min_time_limit_s,
              "time_limit_factor": cfg.plus_time_limit_factor}
    return Problem(task_id=task_id, problem=problem, answer_start=answer_start, prompt=prompt,
                   entry_point=entry_point, test=suite_test({**common, "name": "base", "inputs": base}),
                   reference=cut + task["canonical_solution"],
                   plus_test=suite_test({**common, "name": "plus", "inputs": plus}))


def suite_test(suite: dict[str, Any]) -> str:
    """Code appended to a solution: runs plus_harness.py in its own namespace on this suite."""
    payload = base64.b64encode(pickle.dumps(suite, protocol=4)).decode("ascii")
    return ("def __evalplus_suite():\n"
            "    namespace = {'__name__': 'evalplus_harness'}\n"
            f"    exec({HARNESS_SOURCE!r}, namespace)\n"
            f"    namespace['run'](globals(), {payload!r})\n"
            "__evalplus_suite()\n")


def _all_tuples(x: Any) -> Any:
    return tuple(_all_tuples(i) for i in x) if isinstance(x, list) else x


def mbpp_deserialize_inputs(task_id: str, inputs: list) -> list:
    """evalplus.data.mbpp.mbpp_deserialize_inputs (0.3.1): JSON lists back to the tuples, sets and complex
    numbers the MBPP+ functions take."""
    n = int(task_id.split("/")[-1])
    if n in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740,
             744, 809):
        return [[tuple(lst) for lst in inp] for inp in inputs]
    if n in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
    if n in (75, 413, 444, 753):
        return [[[tuple(lst) for lst in inp[0]]] + [inp[1]] for inp in inputs]
    if n in (106, 750):
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if n in (259, 401, 445):
        return [[tuple(tuple(lst) for lst in lst_lst) for lst_lst in inp] for inp in inputs]
    if n == 278:
        return [[tuple(tuple(item) if isinstance(item, list) else item for item in inp[0])] for inp in inputs]
    if n == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{key: tuple(value) for key, value in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in (580, 615, 791):
        return [_all_tuples(inp) for inp in inputs]
    return inputs
