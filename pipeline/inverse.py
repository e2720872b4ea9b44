"""Steps 2-3 fused: one actor, one engine, summarize then judge each batch of snippets.

The actor loads the model ONCE and uses it for both steps (the judge is the same model, so a second
load would only waste a GPU). For each batch it:
  1. builds one summarize prompt per snippet (a deterministic opening such as "Write a python" ends it),
  2. samples K continuations per prompt (n-sampling: the prompt is prefilled once for all K),
  3. builds K judge prompts per snippet, which share the code (prefix cache), and reads the first token's
     Yes/No log-probabilities, giving the score P(Yes) / (P(Yes) + P(No)).
It returns ONE row per snippet (all K candidates and scores, or the reason it failed), so a snippet is
either wholly done or not done: that is what makes resuming exact. In a run, a batch that comes back after
its actor died goes through `pipeline/crash_isolation.py`, which finds and rejects a snippet that kills
every engine it reaches.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, GenerateConfig
from pipeline.crash_isolation import REASON as CRASH_REASON, CrashIsolation
from pipeline.engines import (Engine, EngineDead, SamplingSpec, close_owned_engine, context_limit_text,
                              create_engine, each_or_alone, restart_actor_if_engine_dead, yes_probability)
from pipeline.output import check_output_seen_here
from pipeline.models import resolve_model_path
from pipeline.prompts import PromptBuilder, pick_prefix, single_token_ids

log = logging.getLogger(__name__)


# One row per snippet: its candidates and their scores (NaN = unscored), or why it failed.
SCORED_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("source_index", pa.int64()),
    ("code", pa.string()), ("lang", pa.string()),
    ("instructions", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
    ("reason", pa.string()), ("detail", pa.string()),
])


class InverseInstruct:
    """Callable class for `ray.data.Dataset.map_batches`: snippets in, one scored row per snippet out."""

    def __init__(self, cfg: GenerateConfig, engine: Engine | None = None, crash_ledger: Any = None,
                 output_marker: tuple[str, str] | None = None) -> None:
        # `engine` lets a caller share an already loaded engine (tests, notebooks). In a run, Ray passes
        # cfg, the stage's crash ledger (see pipeline/crash_isolation.py), told once the engine is up, and
        # the stage's marker file and token: this node must see the output folder its results go to.
        if output_marker is not None:
            check_output_seen_here(cfg.output, *output_marker)
        self.engine = engine or create_engine(cfg.model, resolve_model_path(cfg.model.path))
        self.owns_engine = engine is None
        self.isolation = CrashIsolation(crash_ledger) if crash_ledger is not None else None
        tokenizer = self.engine.tokenizer
        self.prompts = PromptBuilder(tokenizer, cfg.model.prompt_format, cfg.judge.code_first)
        yes, no = single_token_ids(tokenizer, cfg.judge.yes_words), single_token_ids(tokenizer, cfg.judge.no_words)
        if not yes or not no:
            raise ConfigError(
                f"judge.yes_words / judge.no_words: need at least one single-token spelling of each "
                f"for this tokenizer (found yes={yes}, no={no})"
            )
        self.judge_ids, self.num_yes = yes + no, len(yes)
        s = cfg.summarize
        self.spec = SamplingSpec(s.num_candidates, s.temperature, s.top_p, s.repetition_penalty,
                                 s.max_new_tokens, tuple(s.stop))
        self.seed = cfg.model.seed
        self.max_len = self.engine.max_model_len
        self.limit_text = context_limit_text(cfg.model, self.engine)
        self.overlap = cfg.compute.overlap
        # Ray Data may run several batches in this actor at once (compute.concurrent_batches), and judge
        # prompts are built on the engine-loop thread: one tokenizer user at a time (HF fast tokenizers
        # are not safe to share between threads).
        self._tokenizer_lock = threading.Lock()

    def __del__(self) -> None:
        close_owned_engine(self)

    @restart_actor_if_engine_dead
    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.isolation is None:
            return self._score(batch)
        return self.isolation.run(batch, self._score, self._rejected)

    def _rejected(self, batch: pa.Table, details: list[str]) -> pa.Table:
        """Rows for snippets that are not run again: they killed the engine."""
        n = batch.num_rows
        return _scored_table(batch, {"instructions": [[]] * n, "scores": [[]] * n,
                                     "reason": [CRASH_REASON] * n, "detail": details})

    def _score(self, batch: pa.Table) -> pa.Table:
        ids, codes, langs = (batch.column(c).to_pylist() for c in ("id", "code", "lang"))
        out: dict[str, list] = {"instructions": [[] for _ in ids], "scores": [[] for _ in ids],
                                "reason": [None] * len(ids), "detail": [None] * len(ids)}

        # Step 2 prompts. A prompt must leave room for at least one new token.
        prefixes = [pick_prefix(i, lang) for i, lang in zip(ids, langs)]
        with self._tokenizer_lock:
            prompts = [self.prompts.summarize(c, lang, p) for c, lang, p in zip(codes, langs, prefixes)]
        todo = []
        for row, prompt in enumerate(prompts):
            if len(prompt) >= self.max_len:
                out["reason"][row] = "prompt too long"
                out["detail"][row] = f"summarize prompt is {len(prompt)} tokens, {self.limit_text}"
            else:
                todo.append(row)
        seeds = [self._seed(i) for i in ids]

        def judge_prompts(row: int, texts: list[str]) -> list[list[int] | None]:
            """Step 3 prompts of one snippet's candidates; None = too long (that candidate stays unscored)."""
            out["instructions"][row] = [(prefixes[row] + text).strip() for text in texts]
            if self.isolation is not None:
                self.isolation.summarized(ids[row])
            with self._tokenizer_lock:
                built = self.prompts.judge_all(out["instructions"][row], codes[row], langs[row])
            return [p if len(p) < self.max_len else None for p in built]

        fused = getattr(self.engine, "sample_and_judge", None) if self.overlap else None
        scores = None
        if fused is not None and todo:
            try:  # summarize and judge of different snippets overlap inside one engine
                scores = fused([prompts[r] for r in todo], self.spec, [seeds[r] for r in todo],
                               lambda i, texts: judge_prompts(todo[i], texts), self.judge_ids)
                scores = {(todo[i], k): lp for (i, k), lp in scores.items()}
            except EngineDead:
                raise
            except Exception:  # noqa: BLE001 - redo the batch step by step, which isolates a bad snippet
                log.warning("fused summarize+judge failed; redoing the batch step by step", exc_info=True)
                scores = None
        if scores is None:
            for row in todo:  # a failed fused attempt may have filled some; the redo writes them afresh
                out["instructions"][row] = []
            scores = self._step_by_step(prompts, seeds, todo, judge_prompts, out)

        for row in todo:
            k_total = len(out["instructions"][row])
            lps = [scores.get((row, k)) for k in range(k_total)]
            found = [k for k in range(k_total) if lps[k] is not None]
            row_scores = [float("nan")] * k_total
            if found:
                probs = yes_probability(np.stack([lps[k] for k in found]), self.num_yes)
                for k, p in zip(found, probs):
                    row_scores[k] = float(p)
            out["scores"][row] = row_scores
            if not found and out["reason"][row] is None:
                out["reason"][row] = "prompt too long"
                out["detail"][row] = f"no judge prompt fits {self.limit_text}"
        return _scored_table(batch, out)

    def _step_by_step(self, prompts, seeds, todo, judge_prompts, out) -> dict[tuple[int, int], np.ndarray]:
        """Summarize the whole batch, then judge it: for engines without `sample_and_judge`, and the
        fallback that retries failing work item by item (so one bad snippet is rejected alone)."""
        samples = each_or_alone(lambda rows: self.engine.sample(
            [prompts[r] for r in rows], self.spec, [seeds[r] for r in rows]), todo, _reject_into(out))
        pairs, pair_prompts = [], []
        for row, texts in samples.items():
            for k, prompt in enumerate(judge_prompts(row, texts)):
                if prompt is not None:
                    pairs.append((row, k))
                    pair_prompts.append(prompt)
        logprobs = each_or_alone(
            lambda js: list(self.engine.next_token_logprobs([pair_prompts[j] for j in js], self.judge_ids)),
            list(range(len(pairs))), _reject_into(out, row_of=lambda j: pairs[j][0]))
        return {pairs[j]: lp for j, lp in logprobs.items()}

    def _seed(self, snippet_id: str) -> int:
        """Per-snippet sampling seed: reruns and resumed runs draw the same candidates."""
        return int(hashlib.sha256(f"{self.seed}:{snippet_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _scored_table(batch: pa.Table, out: dict[str, list]) -> pa.Table:
    """The batch's snippet columns next to what step 2-3 made of them (`out`: instructions ... detail)."""
    passed = {c: batch.column(c) for c in ("id", "source", "source_index", "code", "lang")}
    return pa.table({**passed, **out}, schema=SCORED_SCHEMA)


def _reject_into(out: dict[str, list], row_of: Callable[[int], int] = lambda i: i) -> Callable[[int, Exception], None]:
    """An `each_or_alone` error handler: the item's snippet gets reason `engine error` (its first error wins)."""
    def reject(item: int, err: Exception) -> None:
        row = row_of(item)
        if out["reason"][row] is None:
            out["reason"][row], out["detail"][row] = "engine error", f"{type(err).__name__}: {err}"[:500]
    return reject
