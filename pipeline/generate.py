"""`generate`: corpus -> snippets -> K scored candidates per snippet -> selected, decontaminated pairs.

Three stages, each a Ray Data job that writes Parquet and then a completion marker (`_stages/NAME.json`,
holding the config fingerprint of the stage, its counts and wall time):

  preprocess  read -> extract (CPU map) -> exact dedup        -> snippets/, _work/rejected_preprocess/
  inverse     snippets -> InverseInstruct (GPU/CPU actor pool) -> _work/scored/ (one row per snippet)
  select      scored -> best candidate, decontaminate         -> candidates/, selected/, rejected/

Resume: a finished stage is skipped; `inverse` skips every snippet already in _work/scored/ (a Parquet
file cut short by a killed writer is deleted and its snippets redone). A changed config redoes the stages
it decides: another `input` or `extract` config keeps the scores of the snippets it leaves unchanged;
another model or scoring config is refused (two configs' scores in one folder) unless `overwrite` is set.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import ray
from ray.data import SaveMode
from ray.data.expressions import col

from pipeline import manifest
from pipeline.config import ConfigError, GenerateConfig, config_changes, fingerprint, stage_configs
from pipeline.crash_isolation import CrashLedger, job_ledger
from pipeline.extract import Rejection, code_key, extract_code
from pipeline.inverse import SCORED_SCHEMA, InverseInstruct
from pipeline.io import check_input, input_version, read_corpus
from pipeline.output import OutputDir, check_output_seen_everywhere, folder_holds, read_parquet
from pipeline.models import model_version, stamps_differ
from pipeline.progress import progress_lines
from pipeline.ray_setup import actor_pool, check_engine_actors, start_ray
from pipeline.select import decide, tie_summary

log = logging.getLogger(__name__)
STAGES = ("preprocess", "inverse", "select")
SNIPPET_COLUMNS = ["id", "source", "source_index", "instruction", "response", "code", "lang"]
REJECTED_COLUMNS = ["id", "source", "source_index", "stage", "reason", "detail"]
SELECTED_COLUMNS = ["id", "instruction", "response", "lang", "score", "k", "source", "source_index"]
CANDIDATE_SCHEMA = pa.schema([("id", pa.string()), ("k", pa.int32()), ("instruction", pa.string()),
                              ("score", pa.float32())])


def _schema(columns: list[str]) -> pa.Schema:
    types = {"source_index": pa.int64(), "k": pa.int64(), "score": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def _columns(ds: ray.data.Dataset, columns: list[str]) -> pd.DataFrame:
    """A few columns on the driver (an empty dataset has no schema to select from)."""
    return ds.select_columns(columns).to_pandas() if ds.count() else pd.DataFrame(columns=columns)


def _write(ds: ray.data.Dataset, out: OutputDir, name: str, schema: pa.Schema) -> None:
    """Replace folder `name` with the dataset's rows; an empty result still leaves a readable table."""
    ds.write_parquet(out.sub(name), mode=SaveMode.OVERWRITE)
    out.ensure_parquet(name, schema)


def generate(cfg: GenerateConfig, overwrite: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the manifest that it also writes to `output/manifest.json`."""
    start_ray(cfg.compute.ray_address, verbose)
    check_engine_actors(cfg)  # (and the model) before the output folder is made
    if not folder_holds(cfg.output, "_stages/preprocess.json"):  # preprocess will read the input: so is it
        check_input(cfg.input)
    out = OutputDir(cfg.output)
    sections, prints = stage_configs(cfg), fingerprint(cfg)
    model, inputs = model_version(cfg.model.path), input_version(cfg.input)
    _forget_changed_stages(out, sections, prints, overwrite, model, inputs)
    stats: dict[str, dict[str, Any]] = {}
    rerun = False  # once a stage runs, every later one reads new inputs and runs too
    for stage, run in (("preprocess", _preprocess), ("inverse", _inverse), ("select", _select)):
        marker = out.read_json(f"_stages/{stage}.json")
        if marker and not rerun:
            log.info("stage %s: already done, skipped", stage)
            stats[stage] = marker
            continue
        rerun = True
        # The token lets every node that writes results check it sees this folder (a local one on a cluster).
        token = uuid.uuid4().hex
        out.write_json(f"_stages/{stage}.started.json",
                       {"fingerprint": prints[stage], "token": token, "model_version": model,
                        "input_version": inputs, "config": sections[stage]})  # what a rerun compares
        check_output_seen_everywhere(cfg.output, out.sub(f"_stages/{stage}.started.json"), token)
        t0 = time.perf_counter()
        counts = run(cfg, out)
        stats[stage] = {"fingerprint": prints[stage], "counts": counts,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "finished_at": datetime.now(timezone.utc).isoformat()}
        out.write_json(f"_stages/{stage}.json", stats[stage])
        log.info("stage %s: done in %.1fs %s", stage, stats[stage]["seconds"], counts)
    result = manifest.build(cfg, stats, model)
    out.write_json("manifest.json", result)
    return result


def _forget_changed_stages(out: OutputDir, sections: dict[str, dict[str, Any]], prints: dict[str, str],
                           overwrite: bool, model: str | None, inputs: str | None) -> None:
    """Make stages whose recorded config differs from this one run again, from the first such stage on.

    The scores `inverse` wrote stay good while the model and the `model`, `summarize` and `judge` config
    are the same: another `input` or `extract` config (a larger input.limit, a new version of the input
    files elsewhere) only adds, removes or changes snippets, and `_preprocess` keeps the score of each
    snippet that is still there unchanged. Scoring with another config, or another model at the same
    `model.path` (see `models.model_version`; unknown versions are not compared), would mix two configs'
    scores in one folder: refused unless `overwrite`, which discards them. A change to `select` only
    redoes that cheap, deterministic stage. Input files that changed since (`io.input_version`: one added
    to the input folder, one replaced) redo preprocess as another input config does.
    """
    started = {s: out.read_json(f"_stages/{s}.started.json") or {} for s in STAGES}
    recorded = {s: started[s].get("fingerprint") for s in STAGES}
    if recorded["inverse"] is None:  # scores without the config they were made with (its marker deleted)
        out.remove("_work/scored")
    changed = [s for s in STAGES if recorded[s] not in (None, prints[s])]
    if stamps_differ(started["preprocess"].get("input_version"), inputs) and "preprocess" not in changed:
        log.info("input: its files changed since the last run in %s; preprocess runs again (the scores of "
                 "snippets that did not change are kept)", out.uri)
        changed = ["preprocess", *changed]
    model_changed = stamps_differ(started["inverse"].get("model_version"), model)
    if model_changed and "inverse" not in changed:
        changed = sorted({*changed, "inverse"}, key=STAGES.index)
    if not changed:
        return
    before = started["inverse"].get("config")  # absent from markers written before it was recorded
    config_changed = recorded["inverse"] not in (None, prints["inverse"]) and (
        before is None or _scoring(before) != _scoring(sections["inverse"]))
    if (config_changed or model_changed) and not overwrite:
        if not config_changed:
            what = "another model (the files at model.path changed since)"
        elif before is None:
            what = "a different config (or by a version of inverse-instruct with other config keys)"
        else:
            what = f"a different config ({'; '.join(config_changes(_scoring(before), _scoring(sections['inverse'])))})"
        raise ConfigError(f"output {out.uri} holds an `inverse` stage made with {what}; use a new --output, "
                          f"or --overwrite to redo it (and what follows) with this config")
    for stage in STAGES[STAGES.index(changed[0]):]:
        out.remove(f"_stages/{stage}.json")
    if config_changed or model_changed:
        out.remove("_work/scored")


def _scoring(inverse_config: dict[str, Any]) -> dict[str, Any]:
    """The sections of the `inverse` stage's config that decide a snippet's score (the rest, `input` and
    `extract`, decide which snippets there are and their code, which each scored row carries)."""
    return {k: inverse_config.get(k) for k in ("model", "summarize", "judge")}


# ---------------------------------------------------------------- stage 1: preprocess


def _extract_row(row: dict[str, Any], cfg: GenerateConfig) -> dict[str, Any]:
    result = {**row, "code": None, "lang": None, "code_key": None, "stage": "read" if row["reason"] else None}
    if row["reason"] is None:
        found = extract_code(row["response"], cfg.extract)
        if isinstance(found, Rejection):
            result.update(stage="extract", reason=found.reason, detail=found.detail)
        else:
            result.update(code=found.code, lang=found.lang, code_key=code_key(found.code))
    return result


def _preprocess(cfg: GenerateConfig, out: OutputDir) -> dict[str, Any]:
    extracted = read_corpus(cfg.input).map(_extract_row, fn_kwargs={"cfg": cfg}).materialize()
    keys = _columns(extracted, ["id", "source", "source_index", "code_key", "reason"])
    if keys.empty:
        log.warning("input %s has no rows", cfg.input.path)
    elif keys["reason"].fillna("").str.startswith("missing field").all():  # the fields are named otherwise
        row = extracted.take(1)[0]
        raise ConfigError(f"input.path: none of its {len(keys)} rows has the fields it is read by (one: "
                          f"{row['reason']}, {row['detail']}); set input.instruction_field / "
                          f"input.response_fields / input.messages_field to its names")
    duplicate_of: dict[str, str] = {}
    if cfg.extract.dedup:
        kept = keys[keys["reason"].isna()].sort_values(["source", "source_index"])
        first = kept.groupby("code_key")["id"].transform("first")
        duplicate_of = dict(zip(kept["id"][kept["id"] != first], first[kept["id"] != first]))

    def mark_duplicate(row: dict[str, Any]) -> dict[str, Any]:
        first = duplicate_of.get(row["id"])
        if first is not None:
            row.update(stage="dedup", reason="duplicate", detail=f"same code as row {first}")
        return row

    marked = extracted.map(mark_duplicate).materialize() if duplicate_of else extracted
    _write(marked.filter(expr=col("reason").is_null()).select_columns(SNIPPET_COLUMNS),
           out, "snippets", _schema(SNIPPET_COLUMNS))
    _write(marked.filter(expr=col("reason").is_not_null()).select_columns(REJECTED_COLUMNS),
           out, "_work/rejected_preprocess", _schema(REJECTED_COLUMNS))
    return {"input": len(keys), "snippets": len(keys) - int(keys["reason"].notna().sum()) - len(duplicate_of),
            "duplicates": len(duplicate_of), "scores_dropped": _keep_unchanged_scores(out)}


def _keep_unchanged_scores(out: OutputDir) -> int:
    """After a preprocess with another `input` or `extract` config (`_forget_changed_stages` kept the
    scores: same model, summarize and judge config): keep the scored row of each snippet that is still
    in snippets/ with the same id, code and lang (its prompts and seed are made of those, so the row is
    what this run would write), drop the others. Returns how many were dropped.

    Kept rows are written as new files before the old files go: a run killed here did not mark
    preprocess done, so the next one comes here again, with no row lost and none stale left."""
    out.read_ids("_work/scored")  # deletes a file cut short by a killed writer
    old = out.parquet_files("_work/scored")
    if not old:
        return 0
    # Materialized: `_columns` counts the rows, then reads them (a lazy dataset would hash every snippet twice).
    snippets = _keyed(read_parquet(out.sub("snippets"), columns=["id", "code", "lang"])).materialize()
    wanted = set(_columns(snippets, ["key"])["key"])
    scored = _keyed(read_parquet(old, filesystem=out.fs, schema=SCORED_SCHEMA)).materialize()
    have = _columns(scored, ["id", "key"])
    keep = have["key"].isin(wanted)
    dropped = int((~keep).sum())
    twice = int(have["id"][keep].duplicated().sum())  # a kill between the two steps below, in an earlier run
    if dropped or twice:
        kept = scored.filter(expr=col("key").is_in(sorted(wanted)))
        if twice:
            kept = kept.groupby("id").map_groups(_first_row, batch_format="pyarrow")
        kept.drop_columns(["key"]).write_parquet(out.sub("_work/scored"), mode=SaveMode.APPEND)
        for path in old:
            out.fs.delete_file(path)
    log.info("preprocess: the scores of %d snippets scored earlier are kept (same snippet, same scoring "
             "config); %d are dropped (their snippet changed or is gone)", len(have) - dropped - twice, dropped)
    return dropped


def _keyed(snippets: ray.data.Dataset) -> ray.data.Dataset:
    """The rows with a `key` column: a hash of what a snippet's scores are made from (id, code, lang)."""
    def add_key(batch: pa.Table) -> pa.Table:
        keys = [hashlib.sha256(f"{i}\0{lang or ''}\0{code}".encode("utf-8", "surrogatepass")).hexdigest()
                for i, code, lang in zip(*(batch.column(c).to_pylist() for c in ("id", "code", "lang")))]
        return batch.append_column("key", pa.array(keys, pa.string()))
    return snippets.map_batches(add_key, batch_format="pyarrow")


# ---------------------------------------------------------------- stage 2: summarize + judge


def _inverse(cfg: GenerateConfig, out: OutputDir) -> dict[str, Any]:
    done = out.read_ids("_work/scored")
    snippets = read_parquet(out.sub("snippets"), columns=["id", "source", "source_index", "code", "lang"])
    total = snippets.count()
    todo = snippets.filter(expr=col("id").not_in(sorted(done))) if done else snippets
    c = cfg.compute
    crashes = CrashLedger().summary()  # all zeros when nothing runs
    if total - len(done) > 0:
        with (job_ledger() as ledger,  # finds and rejects a snippet that kills every engine it reaches
              progress_lines(ledger, "inverse", "snippets", total, len(done), c.progress_every_s)):
            # Blocks of one batch each: every finished batch is written as its own file at once, which is
            # the unit of resume (otherwise a whole input block's results wait in memory until it is done).
            # Cut before the engines start: streamed, the cut is one task that holds a CPU until it has cut
            # the whole input, and on a small machine (the engine actor on one CPU, it on the other) the
            # 1-CPU writes waited for it: no batch of an 80K-snippet run was written in its first 2 minutes,
            # and a run stopped then lost them all. Cut first, it takes about 30 s there, and the blocks are as
            # many as the cut would have queued anyway.
            todo = todo.repartition(target_num_rows_per_block=c.batch_size).materialize()
            marker = "_stages/inverse.started.json"
            seen_by = (out.sub(marker), out.read_json(marker)["token"])  # checked by each actor, on its node
            todo.map_batches(
                InverseInstruct,
                fn_constructor_kwargs={"cfg": cfg, "crash_ledger": ledger, "output_marker": seen_by},
                batch_size=c.batch_size,
                batch_format="pyarrow",
                **actor_pool(cfg),
            ).write_parquet(out.sub("_work/scored"), mode=SaveMode.APPEND)
            crashes = ray.get(ledger.summary.remote())
    out.ensure_parquet("_work/scored", SCORED_SCHEMA)
    scored_ids = out.read_ids("_work/scored")
    if len(scored_ids) != total:  # e.g. written on a node that joined late and does not share a local output
        raise RuntimeError(f"inverse: {total - len(scored_ids)} of {total} snippets were not scored (or were "
                           f"written where {out.uri} does not show them)")
    return {"snippets": total, "resumed_from": len(done), "scored_now": total - len(done), "engine_crashes": crashes}


# ---------------------------------------------------------------- stage 3: select + decontaminate


def _explode_candidates(batch: pa.Table) -> pa.Table:
    rows = batch.to_pydict()
    ids, ks, texts, scores = [], [], [], []
    for sid, instructions, cand_scores in zip(rows["id"], rows["instructions"], rows["scores"]):
        for k, (text, score) in enumerate(zip(instructions, cand_scores)):
            ids.append(sid), ks.append(k), texts.append(text), scores.append(score)
    return pa.table([ids, ks, texts, scores], schema=CANDIDATE_SCHEMA)


def _select(cfg: GenerateConfig, out: OutputDir) -> dict[str, Any]:
    # Read once: candidates/ and the decisions both come from it (one row per snippet, small).
    scored = read_parquet(out.sub("_work/scored"), schema=SCORED_SCHEMA).materialize()
    extra = int(_columns(scored, ["id"])["id"].duplicated().sum())  # from memory: no second listing of the folder
    if extra:  # two runs wrote this --output at once (a job submitted twice): same config, same seeds
        log.warning("select: %d snippets were scored more than once (another run wrote to %s at the same time?); "
                    "one row per snippet is used", extra, out.uri)
        scored = scored.groupby("id").map_groups(_first_row, batch_format="pyarrow").materialize()
    _write(scored.map_batches(_explode_candidates, batch_format="pyarrow"), out, "candidates", CANDIDATE_SCHEMA)
    decided = scored.map_batches(
        decide, fn_kwargs={"select": cfg.select, "decontaminate": cfg.decontaminate}, batch_format="numpy"
    ).materialize()
    _write(decided.filter(expr=col("reason").is_null()).select_columns(SELECTED_COLUMNS),
           out, "selected", _schema(SELECTED_COLUMNS))
    rejected = read_parquet(out.sub("_work/rejected_preprocess")).union(
        decided.filter(expr=col("reason").is_not_null()).select_columns(REJECTED_COLUMNS)).materialize()
    _write(rejected, out, "rejected", _schema(REJECTED_COLUMNS))

    # Counted on the driver: a few short columns, one row per input row (a shuffle would cost more).
    stats = _columns(decided, ["tied", "distinct_scores", "reason"])
    reasons = _columns(rejected, ["stage", "reason"])
    by_reason = (reasons["stage"] + "/" + reasons["reason"]).value_counts().sort_index()
    return {
        "candidates": read_parquet(out.sub("candidates"), columns=["k"]).count(),
        "selected": int(stats["reason"].isna().sum()),
        "rejected": len(reasons),
        "rejected_by_stage_and_reason": {key: int(n) for key, n in by_reason.items()},
        "ties": tie_summary(stats["tied"].tolist(), stats["distinct_scores"].tolist()),
        "scored_more_than_once": extra,
    }


def _first_row(group: pa.Table) -> pa.Table:
    return group.slice(0, 1)

