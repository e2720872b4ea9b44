"""The whole INVERSE-INSTRUCT loop as one job: generate -> train -> evaluate the models -> report.

Each step is the library's own job with its own config section (LoopConfig = a GenerateConfig, a
TrainConfig and an EvaluateConfig), written under one output folder:

    OUTPUT/generate/   the data factory's outputs (selected/ feeds train)
    OUTPUT/train/      checkpoints, the tuned model (model/), report.md + loss.png
    OUTPUT/eval-{base,generator,tuned}-{benchmark}/   samples.jsonl, results.jsonl, summary.json (`generator`:
                       generate's model, where it is not train's base model; see `loop_models`)
    OUTPUT/report.md, OUTPUT/manifest.json   the before/after table and where everything is

Re-running the same command resumes: generate and train resume by themselves (a finished train run is not
redone); a finished evaluation (its summary.json) is reused unless --overwrite, for the tuned model only if
it started after the model was written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

from pipeline.config import ConfigError, EvaluateConfig, LoopConfig, ModelConfig, to_dict
from pipeline.io import check_input
from pipeline.output import OutputDir, folder_holds
from pipeline.models import check_model_here

log = logging.getLogger(__name__)


def run_loop(cfg: LoopConfig, overwrite: bool = False, verbose: bool = False) -> dict[str, Any]:
    from pipeline.engines import VLLM_MISSING
    from pipeline.evaluate.run import evaluate
    from pipeline.generate import generate
    from pipeline.ray_setup import check_installed, own_instance, start_ray
    from pipeline.train.loop import PEFT_MISSING
    from pipeline.train.trainer import train

    start_ray(cfg.generate.compute.ray_address, verbose)  # (the steps find it started)
    # a broken base model fails now, not after generate (which checks its own)
    try:
        check_model_here(cfg.train.model.path, only_node=own_instance())
    except ConfigError as err:
        raise ConfigError(f"train.{err}") from None
    if cfg.train.lora.enabled:  # what the later steps' workers and actors import: missing, it fails now
        check_installed("peft", f"train.{PEFT_MISSING}")
    for step in ("generate", "evaluate"):  # generate checks its own, but only after the loop's folder is made
        if getattr(cfg, step).model.engine == "vllm":
            check_installed("vllm", f"{step}.{VLLM_MISSING}")
    if cfg.evaluate.benchmark.plus_path is not None:  # a bad EvalPlus file fails now, not after training
        from pipeline.evaluate.plus import load_plus_problems

        load_plus_problems(replace(cfg.evaluate.benchmark, name=cfg.benchmarks[0]))
    # A mistyped corpus path fails now: train reads its original corpus only once generate is done (hours on
    # a cluster). Each is checked where its step will still read it (not a finished preprocess or training).
    if not folder_holds(cfg.output, "generate/_stages/preprocess.json"):
        check_input(cfg.generate.input, "generate.input.path")
    if not folder_holds(cfg.output, "train/report.md"):
        check_input(cfg.train_original(), "train.data.original.path" if cfg.train.data.original
                    else "generate.input.path (train's original corpus)")
    out = OutputDir(cfg.output)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    gen_cfg = replace(cfg.generate, output=out.sub("generate"))
    generated = generate(gen_cfg, overwrite=overwrite, verbose=verbose)
    seconds["generate"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    train_cfg = replace(cfg.train, output=out.sub("train"),
                        data=replace(cfg.train.data, generated=f"{gen_cfg.output}/selected",
                                     original=cfg.train_original()))
    trained = train(train_cfg, verbose=verbose, overwrite=overwrite)
    seconds["train"] = round(time.perf_counter() - t0, 1)

    models = loop_models(cfg, trained["outputs"]["model"])
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in cfg.benchmarks:
        for name, path in models.items():
            t0 = time.perf_counter()
            eval_cfg = replace(cfg.evaluate, output=out.sub(f"eval-{name}-{bench}"),
                               benchmark=replace(cfg.evaluate.benchmark, name=bench),
                               model=eval_model(cfg, name, path))
            done = OutputDir(eval_cfg.output)
            previous = done.read_json("summary.json")
            if not overwrite and _still_valid(previous, eval_cfg, trained if name == "tuned" else None):
                log.info("loop: %s %s already evaluated in %s, reusing it", name, bench, eval_cfg.output)
                summary = previous
            else:
                # A stale summary is replaced; a stopped evaluation of this config and model is resumed.
                summary = evaluate(eval_cfg, overwrite=overwrite or previous is not None, verbose=verbose,
                                   replace_stale=True)
            scores.setdefault(bench, {})[name] = summary
            seconds[f"evaluate {name} {bench}"] = round(time.perf_counter() - t0, 1)

    manifest = {
        "job": "loop",
        "config": to_dict(cfg),
        "generate": {"counts": generated["counts"], "output": gen_cfg.output},
        "train": {"steps": trained["steps"], "phases": trained["phases"], "loss": trained["loss"],
                  "throughput": trained["throughput"], "model": models["tuned"],
                  "original": train_cfg.data.original_input().path, "report": trained["outputs"]["report"]},
        "evaluate": {bench: {name: _scores(s, out.sub(f"eval-{name}-{bench}")) for name, s in per.items()}
                     for bench, per in scores.items()},
        "seconds": seconds,
    }
    out.write_json("manifest.json", manifest)
    out.write_text("report.md", render_report(manifest))
    return manifest


def loop_models(cfg: LoopConfig, tuned: str) -> dict[str, str]:
    """The models a loop evaluates: the base model train started from, the tuned one, and, when it is another
    model, the one `generate` ran: the instruction-tuned code LLM the method improves, with which the paper
    compares each InverseCoder model (both fine-tuned from the same base on the original corpus, the tuned one on
    the generated pairs too). Base -> tuned measures all of fine-tuning, not what the generated data added."""
    models = {"base": cfg.train.model.path}
    if cfg.generate.model.path != cfg.train.model.path:
        models["generator"] = cfg.generate.model.path
    return {**models, "tuned": tuned}


def eval_model(cfg: LoopConfig, name: str, path: str) -> ModelConfig:
    """Evaluate's model settings for one of the loop's models. Its prompt format: evaluate's own if set, else the
    one the model generated in (generate's model) or was trained in (base and tuned), so that no model is asked in
    a format it was not tuned for. Remote code the loop's own step already runs for it is trusted here too."""
    ran = cfg.generate.model if name == "generator" else cfg.train.model
    own = cfg.evaluate.model
    prompt_format = own.prompt_format if own.prompt_format != "auto" else ran.prompt_format
    return replace(own, path=path, prompt_format=prompt_format,
                   trust_remote_code=own.trust_remote_code or ran.trust_remote_code)


def _still_valid(summary: dict[str, Any] | None, cfg: EvaluateConfig, trained: dict[str, Any] | None) -> bool:
    """A finished evaluation of this config, and, for the tuned model (`trained`: its train manifest), one that
    started after that model was written: a model retrained since (or a manifest from before its
    `finished_at` existed) is evaluated again."""
    if summary is None or summary.get("config") != to_dict(cfg):
        return False
    if trained is None:
        return True
    if "finished_at" not in trained or "started_at" not in summary:
        return False
    return datetime.fromisoformat(summary["started_at"]) > datetime.fromisoformat(trained["finished_at"])


def _scores(summary: dict[str, Any], output: str) -> dict[str, Any]:
    c = summary["counts"]
    scores = {"pass@1": summary["pass@1"], "passed": c["passed"], "problems": c["problems"], "output": output}
    if "pass@1_plus" in summary:  # EvalPlus' base + extra tests
        scores.update({"pass@1_plus": summary["pass@1_plus"], "passed_plus": c["plus"]["passed"]})
    return scores


COLUMNS = {"base": "base model", "generator": "generate's model", "tuned": "tuned model"}


def model_columns(manifest: dict[str, Any]) -> list[str]:
    """The headers of `before_after_rows`' pass@1 cells: the models evaluated, in order."""
    return [COLUMNS[name] for name in next(iter(manifest["evaluate"].values()))]


def before_after_rows(manifest: dict[str, Any]) -> list[tuple[str, ...]]:
    """(benchmark, pass@1 of each evaluated model, problems) per benchmark; `NAME+` rows for EvalPlus scores."""
    rows = []
    for bench, per in manifest["evaluate"].items():
        base = per["base"]
        for suffix in ("", "_plus") if "pass@1_plus" in base else ("",):
            cells = [f"{s['pass@1' + suffix]:.3f} ({s['passed' + suffix]}/{s['problems']})" for s in per.values()]
            rows.append((bench + ("+" if suffix else ""), *cells, str(base["problems"])))
    return rows


def render_report(m: dict[str, Any]) -> str:
    c, t = m["generate"]["counts"], m["train"]
    names = model_columns(m)
    lines = [
        "# INVERSE-INSTRUCT loop report", "",
        "## Before / after (greedy pass@1)", "",
        "| " + " | ".join(["benchmark", *names, "problems"]) + " |", "|---" * (len(names) + 2) + "|",
        *["| " + " | ".join(row) + " |" for row in before_after_rows(m)], "",
        "## Steps", "",
        f"- generate: {c['input']} input rows -> {c['snippets']} snippets -> {c['candidates']} candidates -> "
        f"{c['selected']} selected ({c['rejected']} rejected, reasons in generate/rejected/)",
        f"- train: {t['steps']} steps over {' -> '.join(t['phases'])}; loss {_num(t['loss']['first'])} -> "
        f"{_num(t['loss']['last'])}; {t['throughput']['tokens_per_s']} tokens/s; report: {t['report']}",
        f"- tuned model: {t['model']}", "",
        "## Wall time (s)", "", "| step | seconds |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in m["seconds"].items()], "",
    ]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
