"""Step 4, select: the best-scoring candidate per snippet, then decontamination.

Scores from a bfloat16 engine collapse to a handful of values, so ties between candidates are common:
the lowest k wins a tie (the first sample), and each row records how many candidates shared the best
score, so that the manifest can report the tie rate (how often the judge stopped discriminating).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import DecontaminateConfig, SelectConfig
from pipeline.decontaminate import BenchmarkIndex
from pipeline.prompts import fenced


@dataclass(frozen=True)
class Choice:
    k: int  # index of the chosen candidate
    score: float
    tied: int  # how many candidates share the best score (1 = no tie)


def best_candidate(scores: list[float]) -> Choice | None:
    """Highest score, lowest k among equals; NaN (unscored) candidates never win. None if none scored."""
    best: Choice | None = None
    for k, score in enumerate(scores):
        if score is None or math.isnan(score):
            continue
        if best is None or score > best.score:
            best = Choice(k=k, score=float(score), tied=1)
        elif score == best.score:
            best = Choice(k=best.k, score=best.score, tied=best.tied + 1)
    return best


def decide(batch: dict[str, Any], select: SelectConfig, decontaminate: DecontaminateConfig) -> dict[str, list]:
    """For `map_batches`: scored snippets in, one decision row per snippet out.

    A decision row is either selected (`reason` is None) or rejected with its stage and reason.
    """
    index = benchmark_index(decontaminate) if decontaminate.enabled else None
    out: dict[str, list] = {c: [] for c in DECISION_COLUMNS}
    for row in range(len(batch["id"])):
        instructions = list(batch["instructions"][row])
        scores = [float(s) for s in batch["scores"][row]]
        choice = None if batch["reason"][row] else best_candidate(scores)
        stage, reason, detail = _verdict(batch, row, instructions, choice, select.min_score, index)
        out["id"].append(batch["id"][row])
        out["source"].append(batch["source"][row])
        out["source_index"].append(int(batch["source_index"][row]))
        out["k"].append(choice.k if choice else None)
        out["instruction"].append(instructions[choice.k] if choice else None)
        # The code in its fence, as in the corpus and the official scripts' data: a model trained on bare code
        # would learn to answer without the Markdown it was instruction-tuned to write.
        out["response"].append(fenced(batch["code"][row], batch["lang"][row]))
        out["lang"].append(batch["lang"][row])
        out["score"].append(choice.score if choice else None)
        out["tied"].append(choice.tied if choice else 0)
        out["distinct_scores"].append(len({s for s in scores if not math.isnan(s)}))
        out["stage"].append(stage)
        out["reason"].append(reason)
        out["detail"].append(detail)
    return out


def _verdict(batch: dict[str, Any], row: int, instructions: list[str], choice: Choice | None,
             min_score: float | None, index: BenchmarkIndex | None) -> tuple[str | None, str | None, str | None]:
    if batch["reason"][row]:
        return "inverse", batch["reason"][row], batch["detail"][row]
    if choice is None:
        return "select", "no scored candidate", "every candidate's judge score is missing"
    if min_score is not None and choice.score < min_score:
        return "select", "below min score", f"best score {choice.score:.4f} < select.min_score={min_score}"
    if index is not None:
        hit = index.match(instructions[choice.k] + "\n" + batch["code"][row])
        if hit is not None:
            return "decontaminate", f"contaminated:{hit.benchmark}", str(hit)
    return None, None, None


_INDEXES: dict[str, BenchmarkIndex] = {}


def benchmark_index(cfg: DecontaminateConfig) -> BenchmarkIndex:
    """One index per worker process and config (building it takes ~0.1 s; Ray reuses worker processes)."""
    key = repr(cfg)
    if key not in _INDEXES:
        _INDEXES[key] = BenchmarkIndex(cfg)
    return _INDEXES[key]


DECISION_COLUMNS = ("id", "source", "source_index", "k", "instruction", "response", "lang", "score",
                    "tied", "distinct_scores", "stage", "reason", "detail")


def tie_summary(tied: list[int], distinct: list[int]) -> dict[str, float | int]:
    """Tie statistics over the snippets that had a best candidate (`tied` >= 1)."""
    rows = [(t, d) for t, d in zip(tied, distinct) if t >= 1]
    n = len(rows)
    return {
        "snippets_with_a_best": n,
        "tie_rate": sum(t > 1 for t, _ in rows) / n if n else 0.0,
        "mean_distinct_scores_per_snippet": sum(d for _, d in rows) / n if n else 0.0,
    }
