"""Our EvalPlus scoring (pipeline/evaluate/plus.py) against evalplus itself: the same verdicts and MBPP+ inputs?

    pip download --no-deps evalplus -d /tmp/ep && unzip -q /tmp/ep/*.whl -d /tmp/ep/x
    pip install --target /tmp/ep/deps tempdir wget appdirs multipledispatch termcolor
    PYTHONPATH=/tmp/ep/x:/tmp/ep/deps .venv/bin/python scripts/evalplus_agreement.py [OUT_DIR]

evalplus is not a dependency (it pulls LLM provider SDKs); only its checker is imported here. The problems are
the test files of tests/conftest.py (EvalPlus' own files cannot be downloaded on the build machines), each
with its canonical solution and a few right and wrong ones.
"""
import copy
import itertools
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline.config import BenchmarkConfig, SandboxConfig  # noqa: E402
from pipeline.evaluate import benchmarks  # noqa: E402
from pipeline.evaluate.plus import load_plus_problems, mbpp_deserialize_inputs as ours_deser, read_tasks  # noqa: E402
from pipeline.evaluate.sandbox import run_program  # noqa: E402
from tests.conftest import write_evalplus_files  # noqa: E402
from tests.test_evaluate_plus import ADJACENT_ONLY, NEWTON, ROUNDED  # noqa: E402

from evalplus.data.mbpp import mbpp_deserialize_inputs as their_deser  # noqa: E402
from evalplus.eval import untrusted_check  # noqa: E402
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS  # noqa: E402
from evalplus.gen.util import trusted_exec  # noqa: E402

CANDIDATES = {  # besides each problem's canonical solution
    "HumanEval/0": ["", "    return False\n", "    return True\n",
                    ADJACENT_ONLY,
                    "    return any(abs(a - b) <= threshold for i, a in enumerate(numbers) for b in numbers[i+1:])\n"],
    "HumanEval/2": ["", ROUNDED, "    return number - int(number)\n",
                    "    return int(number)\n", "    return float(str(number)[str(number).index('.'):])\n"],
    "HumanEval/32": ["", "    return 0.0\n", NEWTON],
    "Mbpp/2": ["def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n",
               "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b), reverse=True))\n",
               "def similar_elements(a, b):\n    return list(set(a) & set(b))\n",
               "def similar_elements(a, b):\n    return (a[0],)\n"],
}
# Every MBPP+ task id evalplus' mbpp_deserialize_inputs special-cases (and one it does not), on generic shapes.
DESERIALIZED_IDS = [2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726,
                    740, 744, 809, 63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780, 75, 413,
                    444, 753, 106, 750, 115, 124, 250, 405, 446, 617, 720, 763, 808, 259, 401, 445, 278, 307, 722,
                    252, 580, 615, 791, 11]
SHAPES = [[[[1, 2], [3, 4]], [[5, 6]], [7, 8]], [[[1, 2]], [3, 4], 5], [["1", "2"], [[1]], [[2]]],
          [[[[1, 2]], [[3]]], [[[4]]], [[5]]], [{"a": [1, 2]}, 3, 4], ["2.5", "1+2j"], [[[1, 2], [], 3]]]


def evalplus_verdicts(name: str, task: dict, code: str) -> list[bool]:
    verdicts = []
    for key in ("base_input", "plus_input"):
        inputs = their_deser(task["task_id"], task[key]) if name == "mbpp" else task[key]
        expected, times = trusted_exec(task["prompt"] + task["canonical_solution"], copy.deepcopy(inputs),
                                       task["entry_point"], record_time=True,
                                       output_not_none=task["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS)
        stat, _ = untrusted_check(name, code, inputs, task["entry_point"], expected, task["atol"], times,
                                  fast_check=True)
        verdicts.append(stat == "pass")
    return verdicts


def deserialized(fn, task_number: int, shape: list) -> tuple[str, str]:
    try:
        return "ok", repr(fn(f"Mbpp/{task_number}", copy.deepcopy([shape])))
    except Exception as err:  # noqa: BLE001 - both must fail alike on a shape a task does not take
        return "error", type(err).__name__


if __name__ == "__main__":
    files = write_evalplus_files(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
    sandbox = SandboxConfig(timeout_s=30)
    agree = differ = 0
    for name in ("humaneval", "mbpp"):
        tasks = {t["task_id"]: t for t in read_tasks(str(files[name]))}
        for p in load_plus_problems(BenchmarkConfig(name=name, plus_path=str(files[name]))):
            for completion in [p.reference, *CANDIDATES[p.task_id]]:
                code = benchmarks.solution(p, completion)
                ours = [run_program(benchmarks.program(p, code, suite), sandbox).reason == "passed"
                        for suite in ("test", "plus_test")]
                theirs = evalplus_verdicts(name, tasks[p.task_id], code)
                agree, differ = agree + (ours == theirs), differ + (ours != theirs)
                print(f"{'same' if ours == theirs else 'DIFF'} {p.task_id:13} ours={ours} evalplus={theirs} "
                      f"{completion.strip()[:50]!r}")
    compared = 0
    for n, shape in itertools.product(DESERIALIZED_IDS, SHAPES):
        ours_, theirs_ = deserialized(ours_deser, n, shape), deserialized(their_deser, n, shape)
        if ours_ != theirs_:
            print("DESERIALIZED DIFF", n, shape, ours_, theirs_)
            differ += 1
        compared += ours_[0] == "ok"
    print(f"verdicts: {agree} the same, {differ} different; MBPP+ inputs the same in {compared} cases")
