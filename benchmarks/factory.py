"""Our fused actor (pipeline/inverse.py) through Ray Data, on the same snippets as seed_replay.

    python -m benchmarks.factory --model embedded|qwen2-1.5b|llama-6.7b --snippets N
        [--batch-size B] [--concurrent-batches C] [--no-overlap] [--code-first] [--ngram-spec T]
        [--max-num-seqs S] [--max-cudagraph-capture-size G] [--log-stats] [--engines E] [--label NAME]

One actor per vLLM engine (E engines share the one GPU, each with 1/E of it: --engines), as `generate` runs
them: K samples per snippet as ONE n=K request, each snippet's K judge requests
(1 new token, exact Yes/No log-probabilities) entering the same engine as soon as its samples are done
(`compute.overlap`), and C batches in the engine at once (`compute.concurrent_batches`), as `generate`
runs it. Steady state = from the first batch's start to the last batch's end inside the actors (Ray Data
is told to wait until every engine is up, so that no engine starts while another works; the snippets are
split into batches before, as `generate` splits its input while the engines load); engine starts are
timed apart. For random-weight models the summaries are forced to the same
per-snippet lengths seed_replay uses (benchmarks/common.py). Also reported: how much of the time the
engine-loop thread was busy on its CPU, and in the actor's own code (judge prompts, adding requests), and
when each batch ran (seconds from the first batch's start), to see how Ray Data kept the engine fed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow as pa

from benchmarks.common import (K, SUMMARY_TOKENS_CAP, GpuMemory, build_model, emit, forced_length, load_snippets,
                               read_lengths)
from pipeline.config import ComputeConfig
from pipeline.crash_isolation import job_ledger
from pipeline.ray_setup import actor_pool
from pipeline.inverse import InverseInstruct


class TimedInverseInstruct(InverseInstruct):
    """The production actor plus timestamps; for random weights, summaries forced to a per-snippet length."""

    def __init__(self, cfg, forced: dict[str, int] | None = None, crash_ledger=None) -> None:
        t0 = time.time()
        super().__init__(cfg, crash_ledger=crash_ledger)
        self.init = (t0, time.time())
        if forced:
            self._force_lengths(forced)

    def _force_lengths(self, forced: dict[str, int]) -> None:
        by_seed = {self._seed(sid): n for sid, n in forced.items()}
        engine = self.engine

        def params(prompt, spec, seed):
            n = by_seed[seed]
            return engine._params(n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                                  repetition_penalty=spec.repetition_penalty, max_tokens=n, min_tokens=n,
                                  ignore_eos=True, seed=seed, output_kind=engine._final_only)

        engine._sample_params = params

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()
        out = super().__call__(batch)
        n = out.num_rows
        stats = self.engine.loop.stats  # cumulative: the last batch's values are the run's
        cache = self.engine.llm.llm_engine.vllm_config.cache_config
        columns = {"t0": t0, "t1": time.time(), "init0": self.init[0], "init1": self.init[1],
                   "loop_busy_s": stats.busy_s, "loop_cpu_s": stats.cpu_s, "loop_callbacks_s": stats.callbacks_s,
                   # started with the KV cache size another engine on its GPU measured (vllm_start.py)
                   "kv_size_given": cache.kv_cache_memory_bytes is not None, "kv_blocks": cache.num_gpu_blocks}
        for name, value in columns.items():
            out = out.append_column(name, pa.array([value] * n))
        return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--snippets", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=0,
                    help="snippets per actor call (0 = --snippets / (4 x --engines))")
    ap.add_argument("--concurrent-batches", type=int, default=ComputeConfig().concurrent_batches)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-overlap", action="store_true", help="summarize the whole batch, then judge it")
    ap.add_argument("--code-first", action="store_true", help="judge prompt with the code first")
    ap.add_argument("--ngram-spec", type=int, default=0, help="prompt-lookup speculative tokens (0 = off)")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="vLLM's running-request limit (0 = vLLM's default)")
    ap.add_argument("--max-cudagraph-capture-size", type=int, default=0,
                    help="largest step vLLM runs as a CUDA graph (0 = vLLM's default, 512 at most)")
    ap.add_argument("--log-stats", action="store_true",
                    help="vLLM's periodic stats line in the log (model.log_engine_stats)")
    ap.add_argument("--engines", type=int, default=1,
                    help="engine actors sharing the GPU (compute.num_gpus_per_actor = 1/E; on CPU: E actors)")
    ap.add_argument("--label", default="factory")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ii-bench"))
    return ap


def main() -> None:
    args = parser().parse_args()

    import ray
    import torch

    from pipeline.config import GenerateConfig, JudgeConfig, ModelConfig, SummarizeConfig

    model = build_model(args.model, args.workdir)
    snippets = load_snippets(args.snippets)
    lengths = read_lengths()
    forced = None if model.real else {s["id"]: forced_length(s["id"], lengths["summary"]) for s in snippets}
    on_gpu = torch.cuda.is_available()
    cfg = GenerateConfig(
        model=ModelConfig(path=model.path, dtype="bfloat16" if on_gpu else "float32", max_model_len=args.max_model_len,
                          load_format=model.load_format, speculative_ngram_tokens=args.ngram_spec or None,
                          max_num_seqs=args.max_num_seqs or None, log_engine_stats=args.log_stats,
                          max_cudagraph_capture_size=args.max_cudagraph_capture_size or None,
                          cpu_memory_utilization=ModelConfig().cpu_memory_utilization / args.engines),
        summarize=SummarizeConfig(num_candidates=K, max_new_tokens=SUMMARY_TOKENS_CAP),
        judge=JudgeConfig(code_first=args.code_first),
        compute=ComputeConfig(batch_size=args.batch_size or max(1, len(snippets) // (4 * args.engines)),
                              overlap=not args.no_overlap, concurrent_batches=args.concurrent_batches,
                              num_gpus_per_actor=1.0 / args.engines if on_gpu else 0.0,
                              min_actors=args.engines, max_actors=args.engines),
    )
    ray.init(num_cpus=max(4 if on_gpu else 2, args.engines + 3), include_dashboard=False, logging_level="WARNING")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = 3600  # every engine up before the first batch: a clean steady state
    memory = GpuMemory()
    t_all = time.time()
    # Split into batch-sized blocks before the engines start, as a real run has them by then: `generate`
    # reads and splits its input while the engines load. Here the gate above also holds back all work
    # upstream of the engines; split after it, the 8 slots of 4 engines on an H100 all had a batch only
    # 3.7 s into a 13.2 s steady window (2026-11-24), an artifact of this benchmark alone.
    ds = ray.data.from_arrow(pa.Table.from_pylist(snippets)).repartition(
        target_num_rows_per_block=cfg.compute.batch_size).materialize()
    with job_ledger() as ledger:  # the crash ledger `generate` uses, so that its cost is in the numbers
        out = ds.map_batches(
            TimedInverseInstruct, batch_size=cfg.compute.batch_size,
            fn_constructor_kwargs={"cfg": cfg, "forced": forced, "crash_ledger": ledger},
            batch_format="pyarrow", num_gpus=cfg.compute.num_gpus_per_actor, num_cpus=1, **actor_pool(cfg),
        ).to_arrow_refs()
        table = pa.concat_tables(ray.get(out))
        wall = time.time() - t_all  # until the results are in; not the engines' close at the stage's end
    rows = table.to_pylist()
    first = min(r["t0"] for r in rows)
    steady = max(r["t1"] for r in rows) - first
    # one (start, end) per batch: a batch's rows share exact timestamps; rounding comes after, so that two
    # batches that ran together are not merged into one
    batches = [(round(t0 - first, 1), round(t1 - first, 1)) for t0, t1 in sorted({(r["t0"], r["t1"]) for r in rows})]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(model.path)
    out_tokens = (sum(forced.values()) * K if forced else
                  sum(len(tok(t, add_special_tokens=False)["input_ids"]) for r in rows for t in r["instructions"]))
    failed = sum(1 for r in rows if r["reason"])
    # per actor (its start time tells it apart): the loop counters are cumulative, its last batch has them all
    actors: dict[float, dict] = {}
    for r in rows:
        a = actors.setdefault(r["init0"], {"start_s": r["init1"] - r["init0"], "kv_size_given": r["kv_size_given"],
                                           "kv_blocks": r["kv_blocks"]})
        for k in ("loop_busy_s", "loop_cpu_s", "loop_callbacks_s"):
            a[k] = max(a.get(k, 0.0), r[k])
    loop = {k: sum(a[k] for a in actors.values()) for k in ("loop_busy_s", "loop_cpu_s", "loop_callbacks_s")}
    busy = max(loop["loop_busy_s"], 1e-9)
    emit({
        "variant": args.label, "model": model.name, "params": model.params, "real_weights": model.real,
        "forced_lengths": None if model.real else lengths["source"],
        "snippets": len(rows), "failed_snippets": failed, "batch_size": cfg.compute.batch_size,
        "concurrent_batches": cfg.compute.concurrent_batches,
        "overlap": cfg.compute.overlap, "code_first": args.code_first, "ngram_spec": args.ngram_spec,
        "engines": len(actors), "gpu_memory_utilization": cfg.model.gpu_memory_utilization if on_gpu else None,
        # the slowest engine start; several engines on one GPU: the first alone, then the others together
        "engine_start_s": round(max(a["start_s"] for a in actors.values()), 1),
        "engine_starts_s": [round(a["start_s"], 1) for _, a in sorted(actors.items())],
        "engines_given_kv_size": sum(a["kv_size_given"] for a in actors.values()),
        "kv_blocks": [a["kv_blocks"] for _, a in sorted(actors.items())],
        # >= 0: no batch ran before the last engine was up, so the steady state had them all
        "first_batch_after_last_start_s": round(first - max(r["init1"] for r in rows), 1),
        "steady_s": round(steady, 1),
        # when the last of the first engines x concurrent_batches batches started: until then some engine
        # slot had nothing to do (3.7 s of 13.2 with four engines before the input was split beforehand)
        "ramp_s": round(sorted(b[0] for b in batches)[min(len(actors) * cfg.compute.concurrent_batches,
                                                           len(batches)) - 1], 1),
        "wall_s": round(wall, 1), "snippets_per_s": round(len(rows) / steady, 3),
        "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / steady, 1),
        "peak_gpu_memory_gib": memory.stop(),
        # The thread that feeds the engine: busy all the time on its CPU = it, not the GPU, sets the pace.
        "loop_cpu_share": round(loop["loop_cpu_s"] / busy, 3),
        "loop_callbacks_share": round(loop["loop_callbacks_s"] / busy, 3),
        "max_num_seqs": args.max_num_seqs or None,
        "max_cudagraph_capture_size": args.max_cudagraph_capture_size or None, "batches_s": [list(b) for b in batches],
    })
    ray.shutdown()


if __name__ == "__main__":
    main()
