"""`evaluate`: greedy pass@1 of a model on HumanEval or MBPP, as one Ray Data job.

  problems (driver) -> Completer actors (one engine each; greedy, temperature 0) -> completion per problem
                    -> execute tasks (CPU; one sandboxed process per program)    -> passed / reason
                    -> driver: samples.jsonl, results.jsonl, summary.json

The two stages stream: programs run while later batches are still being generated. The output is small
(one row per problem), so the driver collects it and writes the three files through pipeline/output.py's
OutputDir (local or s3://). Each batch of results is also written to `_work/results/` as it arrives: a stopped
run, started again with the same config and output, evaluates only the problems it had not finished.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import ray

from pipeline.config import (ConfigError, EvaluateConfig, SandboxConfig, config_changes, deciding_model_config,
                             to_dict)
from pipeline.crash_isolation import REASON as CRASH_REASON, CrashIsolation, CrashLedger, job_ledger
from pipeline.engines import (Engine, SamplingSpec, close_owned_engine, context_limit_text, create_engine,
                              each_or_alone, restart_actor_if_engine_dead)
from pipeline.evaluate import benchmarks
from pipeline.evaluate.plus import load_plus_problems
from pipeline.evaluate.sandbox import Outcome, run_program
from pipeline.output import OutputDir
from pipeline.manifest import versions
from pipeline.models import model_version, resolve_model_path, stamps_differ
from pipeline.progress import progress_lines
from pipeline.prompts import PromptBuilder

log = logging.getLogger(__name__)
FILES = ("samples.jsonl", "results.jsonl", "summary.json")
WORK, STARTED, RESULTS_SO_FAR = "_work", "_work/started.json", "_work/results"  # a stopped run's results
_KEPT = ("index", "task_id", "completion", "generation_s", "engine_load_s", "prompt_format")
RESULT_SCHEMA = pa.schema([
    ("index", pa.int64()), ("task_id", pa.string()), ("completion", pa.string()), ("generation_s", pa.float64()),
    ("engine_load_s", pa.float64()), ("prompt_format", pa.string()), ("solution", pa.string()),
    ("passed", pa.bool_()), ("reason", pa.string()), ("detail", pa.string()), ("seconds", pa.float64()),
    ("isolation", pa.string()), ("plus_passed", pa.bool_()), ("plus_reason", pa.string()),
    ("plus_detail", pa.string()), ("plus_seconds", pa.float64()),
])
PLUS_KEYS = ("plus_passed", "plus_reason", "plus_detail", "plus_seconds")


class Completer:
    """Callable class for `map_batches`: problems in, one greedy completion per problem out."""

    def __init__(self, cfg: EvaluateConfig, engine: Engine | None = None, crash_ledger: Any = None) -> None:
        # In a run, Ray passes cfg and the job's crash ledger: a prompt that kills every engine it reaches
        # fails its problem (`engine crash`) instead of the job (see pipeline/crash_isolation.py).
        t0 = time.perf_counter()
        self.engine = engine or create_engine(cfg.model, resolve_model_path(cfg.model.path))
        self.owns_engine = engine is None
        self.isolation = CrashIsolation(crash_ledger, id_column="task_id") if crash_ledger is not None else None
        self.load_s: float | None = time.perf_counter() - t0  # reported once, with this actor's first batch
        self._lock = threading.Lock()
        self.prompts = PromptBuilder(self.engine.tokenizer, cfg.model.prompt_format)
        self.limit_text = context_limit_text(cfg.model, self.engine)
        self.spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                                 max_new_tokens=cfg.generation.max_new_tokens, stop=())

    def __del__(self) -> None:
        close_owned_engine(self)

    @restart_actor_if_engine_dead
    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.isolation is None:
            return self._complete_batch(batch)
        return self.isolation.run(batch, self._complete_batch, self._rejected)

    def _rejected(self, batch: pa.Table, details: list[str]) -> pa.Table:
        """Problems whose prompt is not run again: it killed the engine."""
        n = batch.num_rows
        return self._with_outputs(batch, [""] * n, [f"{CRASH_REASON}: {d}" for d in details], 0.0, None)

    def _complete_batch(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        n = len(rows)
        completions, errors = [""] * n, [None] * n
        with self._lock:  # Ray Data may call with several batches at once (compute.concurrent_batches)
            prompts = [self.prompts.solve(r["problem"], r["answer_start"]) for r in rows]
            load, self.load_s = (self.load_s, None) if n else (None, self.load_s)
        todo = []
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.engine.max_model_len:
                errors[i] = f"prompt too long: {len(prompt)} tokens, {self.limit_text}"
            else:
                todo.append(i)
        for i, text in self._complete(prompts, todo, errors).items():
            completions[i] = text
        return self._with_outputs(batch, completions, errors, (time.perf_counter() - t0) / max(1, n), load)

    def _with_outputs(self, batch: pa.Table, completions: list[str], errors: list[str | None], per_row: float,
                      load: float | None) -> pa.Table:
        n = batch.num_rows
        added = {"completion": (completions, pa.string()), "generation_error": (errors, pa.string()),
                 "generation_s": ([per_row] * n, pa.float64()),
                 "engine_load_s": ([load] + [None] * (n - 1) if n else [], pa.float64()),
                 "prompt_format": ([self.prompts.prompt_format] * n, pa.string())}
        for name, (values, type_) in added.items():
            batch = batch.append_column(name, pa.array(values, type_))
        return batch

    def _complete(self, prompts: list[list[int]], todo: list[int], errors: list[str | None]) -> dict[int, str]:
        """All at once; if the engine raises, each alone, so one bad prompt fails only its problem."""
        def fail(i: int, err: Exception) -> None:
            errors[i] = f"engine error: {type(err).__name__}: {err}"[:500]

        texts = each_or_alone(lambda rows: self.engine.sample([prompts[i] for i in rows], self.spec, [0] * len(rows)),
                              todo, fail)
        return {i: t[0] for i, t in texts.items()}


def execute(batch: pa.Table, sandbox: SandboxConfig) -> pa.Table:
    """Ray task: build each problem's program(s) and run them in the sandbox, one after the other. With
    EvalPlus tests, the plus suite is a second program, and plus passes only if base passes too."""
    rows = []
    for row in batch.to_pylist():
        code = benchmarks.solution(row, row["completion"])
        if row["generation_error"]:  # nothing was generated: nothing to run
            reason, _, detail = row["generation_error"].partition(": ")
            outcome = plus = Outcome(False, reason, detail, 0.0, "none")
        else:
            outcome = run_program(benchmarks.program(row, code), sandbox)
            plus = run_program(benchmarks.program(row, code, "plus_test"), sandbox) if row["plus_test"] else None
        result = {**{k: row[k] for k in _KEPT}, "solution": code, **asdict(outcome)}
        if row["plus_test"]:
            result.update(plus_passed=outcome.passed and plus.passed, plus_reason=plus.reason,
                          plus_detail=plus.detail, plus_seconds=plus.seconds)
        rows.append(result)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def evaluate(cfg: EvaluateConfig, overwrite: bool = False, verbose: bool = False,
             replace_stale: bool = False) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary that it also writes to `output/summary.json`.

    Resume: each batch of results is written to `_work/results/` as it arrives, so a stopped run of the same
    config continues with the problems it had not finished. Work made with another config (or another model
    at the same path) is refused unless `overwrite` (start afresh) or `replace_stale` (what `loop` asks:
    discard it, keep work that still matches). `_work/` is removed once the three files are written."""
    from pipeline.ray_setup import actor_pool, check_engine_actors, start_ray

    evalplus = cfg.benchmark.plus_path is not None
    if evalplus:  # EvalPlus' problems and test suites, which run longer than a few asserts
        problems = load_plus_problems(cfg.benchmark)
        sandbox = replace(cfg.sandbox, timeout_s=cfg.benchmark.plus_timeout_s)
    else:
        problems, sandbox = benchmarks.load_problems(cfg.benchmark.name, cfg.benchmark.limit), cfg.sandbox
    start_ray(cfg.compute.ray_address, verbose)
    check_engine_actors(cfg)  # (and the model) before the output folder is made
    out = OutputDir(cfg.output)
    order = {p.task_id: i for i, p in enumerate(problems)}
    # One row per problem still asked for (two runs at once on one folder could both have written one).
    earlier = {r["task_id"]: r for r in _earlier_results(out, cfg, overwrite, replace_stale) if r["task_id"] in order}
    done = list(earlier.values())
    if done:
        log.info("evaluate: resuming in %s, %d of %d problems done by an earlier run", out.uri, len(done),
                 len(problems))
    started_at = datetime.now(timezone.utc).isoformat()
    t0 = time.perf_counter()
    c = cfg.compute
    items = [{"index": i, **p.to_row()} for i, p in enumerate(problems) if p.task_id not in earlier]
    rows, crashes = list(done), CrashLedger().summary()  # all zeros when nothing runs
    if items:
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // c.batch_size)))
        with job_ledger() as ledger, progress_lines(ledger, "evaluate", "completions", len(problems), len(done),
                                                    every_s=c.progress_every_s):
            results = ds.map_batches(
                Completer, fn_constructor_kwargs={"cfg": cfg, "crash_ledger": ledger}, batch_size=c.batch_size,
                batch_format="pyarrow", **actor_pool(cfg),
            ).map_batches(
                execute, fn_kwargs={"sandbox": sandbox}, batch_size=c.batch_size, num_cpus=1,
                batch_format="pyarrow",
            )
            for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                out.write_parquet(f"{RESULTS_SO_FAR}/{uuid.uuid4().hex}.parquet", batch)  # what a stop keeps
                rows.extend(batch.to_pylist())
            crashes = ray.get(ledger.summary.remote())
    wall = time.perf_counter() - t0
    rows.sort(key=lambda r: order[r["task_id"]])
    if [r["task_id"] for r in rows] != list(order):  # every problem exactly once
        raise RuntimeError(f"evaluate: {len(rows)} results for {len(problems)} problems")

    _write_jsonl(out, "samples.jsonl", [{"task_id": r["task_id"], "solution": r["solution"]} for r in rows])
    keys = ("task_id", "passed", "reason", "detail", "seconds", "isolation", "completion", "generation_s",
            *(PLUS_KEYS if evalplus else ()))
    _write_jsonl(out, "results.jsonl", [{k: r[k] for k in keys} for r in rows])
    result = {**summarize(cfg, rows, wall, started_at), "resumed_from": len(done), "engine_crashes": crashes}
    out.write_json("summary.json", result)
    out.remove(WORK)
    return result


def _earlier_results(out: OutputDir, cfg: EvaluateConfig, overwrite: bool, replace_stale: bool) -> list[dict]:
    """The result rows a stopped run of this config left in the output folder; [] after clearing it where
    there are none to keep (then this run's config is recorded, for the next run to compare)."""
    if out.exists("summary.json") and not overwrite:
        raise ConfigError(f"output {out.uri} already holds an evaluation (summary.json); use a new --output "
                          f"or --overwrite")
    now = {"config": _deciding(cfg), "model_version": model_version(cfg.model.path)}
    started = out.read_json(STARTED)
    if started is not None and not overwrite:
        diff = config_changes(started["config"], now["config"])
        changed = [f"another config ({'; '.join(diff)})"] if diff else []
        if stamps_differ(started.get("model_version"), now["model_version"]):
            changed.append("another model at model.path (its files changed since)")
        if not changed:
            tables = out.read_tables(RESULTS_SO_FAR)
            return pa.concat_tables(tables, promote_options="default").to_pylist() if tables else []
        if not replace_stale:
            raise ConfigError(f"output {out.uri} holds part of an evaluation of {' and of '.join(changed)}; use a "
                              f"new --output, or --overwrite to start afresh")
    for name in (*FILES, WORK):
        out.remove(name)
    out.write_json(STARTED, now)
    return []


def _deciding(cfg: EvaluateConfig) -> dict[str, Any]:
    """The config that decides a problem's result: not `compute`, `output`, the engine's speed settings, nor
    `benchmark.limit` (another limit keeps the results of the problems it still takes)."""
    d = to_dict(cfg)
    return {"model": deciding_model_config(d["model"]),
            "benchmark": {k: v for k, v in d["benchmark"].items() if k != "limit"},
            "generation": d["generation"], "sandbox": d["sandbox"]}


def summarize(cfg: EvaluateConfig, rows: list[dict[str, Any]], wall: float, started_at: str) -> dict[str, Any]:
    passed = sum(r["passed"] for r in rows)
    formats = sorted({r["prompt_format"] for r in rows})
    evalplus = cfg.benchmark.plus_path is not None
    summary = {
        "job": "evaluate",
        "benchmark": cfg.benchmark.name,
        "benchmark_source": (f"EvalPlus {cfg.benchmark.plus_path}: base = outputs on base_input equal the "
                             f"canonical solution's; plus = base and the same on plus_input") if evalplus
        else benchmarks.SOURCES[cfg.benchmark.name],
        "model": cfg.model.path,
        "engine": cfg.model.engine,
        "prompt_format": formats[0] if len(formats) == 1 else formats,
        "decoding": {"greedy": True, "temperature": 0.0, "max_new_tokens": cfg.generation.max_new_tokens},
        "pass@1": passed / len(rows) if rows else None,
        "counts": {"problems": len(rows), "passed": passed, "failed": len(rows) - passed,
                   "by_reason": dict(sorted(Counter(r["reason"] for r in rows).items()))},
        # Which isolation the sandbox achieved (namespace | audit); "none" = nothing was run.
        "sandbox_isolation": sorted({r["isolation"] for r in rows}),
        "seconds": {
            "wall": round(wall, 2),
            "engine_load": round(sum(r["engine_load_s"] or 0.0 for r in rows), 2),
            "generation": round(sum(r["generation_s"] for r in rows), 2),
            "execution": round(sum(r["seconds"] for r in rows), 2),
        },
        "started_at": started_at,
        "config": to_dict(cfg),
        "versions": versions(),
        "files": list(FILES),
    }
    if evalplus:  # EvalPlus' "base + extra tests" score
        plus = sum(r["plus_passed"] for r in rows)
        summary["pass@1_plus"] = plus / len(rows) if rows else None
        summary["counts"]["plus"] = {"passed": plus, "failed": len(rows) - plus,
                                     "by_reason": dict(sorted(Counter(r["plus_reason"] for r in rows).items()))}
    return summary


def _write_jsonl(out: OutputDir, name: str, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line; written to a temp name then moved, like OutputDir.write_json."""
    tmp, final = f"{out.root}/.{name}.tmp", f"{out.root}/{name}"
    with out.fs.open_output_stream(tmp) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    out.fs.move(tmp, final)
