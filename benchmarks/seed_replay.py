"""The baseline: a faithful replay of the official InverseCoder scripts' request pattern.

    python -m benchmarks.seed_replay --model embedded|qwen2-1.5b|llama-6.7b --snippets N [--workdir DIR]

1. summarize: one engine; K=10 SEPARATE n=1 requests per snippet (temperature 0.8, repetition penalty
   1.1), sent in synchronous chunks of 512 prompts (the next chunk waits for the slowest of the last);
2. judge: a SECOND engine (a second model load) in the paper's prompt order (instruction, then code),
   greedy, max 5 new tokens, top-5 log-probabilities; the score from the first token's Yes/No.
Engine starts are timed apart from the steady-state work. vLLM's own defaults otherwise (prefix caching
on, as the official scripts get from vLLM 0.26).

Then, on the judge engine (not part of the baseline's time): the judge stage measured alone the way the
factory judges (1 new token, exact Yes/No log-probabilities) in both prompt orders, with prefill tokens/s,
MFU and the Spearman agreement of code-first scores with the paper's order. On the embedded model this
run also writes WORKDIR/lengths.json (the real summary/judge output lengths); the random-weight models
are forced to the committed one, benchmarks/results/lengths-embedded.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (CHUNK, JUDGE_MAX_TOKENS, JUDGE_TOP_LOGPROBS, K, SUMMARY_TOKENS_CAP, GpuMemory,
                               Model, build_model, device_name, emit, engine_defaults, forced_length, load_snippets,
                               mfu, read_lengths, spearman, versions)


def start_engine(model: Model, max_model_len: int, extra: dict | None = None):
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=model.path, max_model_len=max_model_len, load_format=model.load_format, seed=0,
              **engine_defaults(), **(extra or {}))
    return llm, time.perf_counter() - t0


def stop_engine(llm) -> None:
    import torch

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - older/newer vLLM: dropping the object shuts it down too
        pass
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def run_chunks(llm, prompts: list[list[int]], params: list) -> tuple[list, float]:
    outputs, t0 = [], time.perf_counter()
    for start in range(0, len(prompts), CHUNK):
        outputs += llm.generate([{"prompt_token_ids": p} for p in prompts[start:start + CHUNK]],
                                params[start:start + CHUNK], use_tqdm=False)
    return outputs, time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--snippets", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ii-bench"))
    return ap


def main() -> None:
    args = parser().parse_args()

    from vllm import SamplingParams

    from pipeline.config import JudgeConfig
    from pipeline.engines import yes_probability
    from pipeline.prompts import PromptBuilder, pick_prefix, single_token_ids

    model = build_model(args.model, args.workdir)
    snippets = load_snippets(args.snippets)
    lengths = read_lengths()
    memory = GpuMemory()

    # --- 1. summarize: K separate n=1 requests per snippet, synchronous chunks of 512 ---
    llm, start_s = start_engine(model, args.max_model_len)
    tok = llm.get_tokenizer()
    paper = PromptBuilder(tok, "auto")
    prefixes = [pick_prefix(s["id"], s["lang"]) for s in snippets]
    base = [paper.summarize(s["code"], s["lang"], p) for s, p in zip(snippets, prefixes)]
    prompts, params = [], []
    for i, (s, p) in enumerate(zip(snippets, base)):
        for k in range(K):
            # no per-request seed: the official scripts set none (the engine's seed=0 makes a run repeatable)
            common = dict(n=1, temperature=0.8, top_p=1.0, repetition_penalty=1.1)
            if model.real:
                sp = SamplingParams(**common, max_tokens=SUMMARY_TOKENS_CAP, stop=["```"])
            else:
                n_tok = forced_length(s["id"], lengths["summary"])
                sp = SamplingParams(**common, max_tokens=n_tok, min_tokens=n_tok, ignore_eos=True)
            prompts.append(p)
            params.append(sp)
    outs, summarize_s = run_chunks(llm, prompts, params)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    texts = [[(prefixes[i] + outs[i * K + k].outputs[0].text).strip() for k in range(K)] for i in range(len(snippets))]
    stop_engine(llm)

    # --- 2. judge: a second engine, paper order, greedy, 5 tokens, top-5 logprobs ---
    llm, judge_start_s = start_engine(model, args.max_model_len)
    pairs = [(i, k) for i in range(len(snippets)) for k in range(K)]
    judge_prompts = [paper.judge(texts[i][k], snippets[i]["code"], snippets[i]["lang"]) for i, k in pairs]
    fits = [j for j, p in enumerate(judge_prompts) if len(p) < args.max_model_len - JUDGE_MAX_TOKENS]
    j_len = JUDGE_MAX_TOKENS if model.real else max(1, int(np.median(lengths["judge"])))
    jp = (SamplingParams(temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, logprobs=JUDGE_TOP_LOGPROBS) if model.real
          else SamplingParams(temperature=0.0, max_tokens=j_len, min_tokens=j_len, ignore_eos=True,
                              logprobs=JUDGE_TOP_LOGPROBS))
    jouts, judge_s = run_chunks(llm, [judge_prompts[j] for j in fits], [jp] * len(fits))
    judge_out_tokens = [len(o.outputs[0].token_ids) for o in jouts]
    steady_s = summarize_s + judge_s

    result = {
        "variant": "seed_replay", "model": model.name, "params": model.params, "real_weights": model.real,
        "forced_lengths": None if model.real else lengths["source"],
        "snippets": len(snippets), "candidates": len(pairs), "judged": len(fits),
        "engine_start_s": round(start_s + judge_start_s, 1), "summarize_s": round(summarize_s, 1),
        "judge_s": round(judge_s, 1), "steady_s": round(steady_s, 1),
        "snippets_per_s": round(len(snippets) / steady_s, 3),
        "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / summarize_s, 1),
        "judge_prompt_tokens": sum(len(judge_prompts[j]) for j in fits),
    }

    # --- 3. the judge stage alone, on this engine: factory-style (1 token, exact Yes/No) in both orders ---
    jcfg = JudgeConfig()
    ids = single_token_ids(tok, jcfg.yes_words) + single_token_ids(tok, jcfg.no_words)
    num_yes = len(single_token_ids(tok, jcfg.yes_words))
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=len(ids), logprob_token_ids=ids)
    scores = {}
    for order, builder in (("paper_order", paper), ("code_first", PromptBuilder(tok, "auto", code_first=True))):
        llm.reset_prefix_cache()
        ps = [builder.judge(texts[i][k], snippets[i]["code"], snippets[i]["lang"]) for i, k in pairs]
        ps = [ps[j] for j in fits]
        t0 = time.perf_counter()
        o = llm.generate([{"prompt_token_ids": p} for p in ps], one, use_tqdm=False)
        secs = time.perf_counter() - t0
        computed = sum(len(x.prompt_token_ids) - (x.num_cached_tokens or 0) for x in o)
        lp = np.array([[x.outputs[0].logprobs[0][t].logprob if t in x.outputs[0].logprobs[0] else -np.inf
                        for t in ids] for x in o], dtype=np.float32)
        scores[order] = yes_probability(lp, num_yes)
        result[f"judge_{order}_s"] = round(secs, 2)
        result[f"judge_{order}_prefill_tokens_per_s"] = round(computed / secs, 0)
        result[f"judge_{order}_cached_share"] = round(1 - computed / sum(len(p) for p in ps), 3)
        result[f"judge_{order}_mfu"] = mfu(model.params, computed, secs)
    if model.real and len(fits) == len(pairs):
        result["judge_order_spearman"] = round(spearman(scores["paper_order"], scores["code_first"]), 3)
        by = {o: [int(np.nanargmax(s[i * K:(i + 1) * K])) for i in range(len(snippets))] for o, s in scores.items()}
        result["judge_order_same_pick"] = round(float(np.mean(np.array(by["paper_order"]) == np.array(by["code_first"]))), 3)
    stop_engine(llm)
    result["peak_gpu_memory_gib"] = memory.stop()

    if model.real:  # the real length distributions, for the random-weight models
        (args.workdir / "lengths.json").write_text(json.dumps({
            "summary": [len(o.outputs[0].token_ids) for o in outs], "judge": judge_out_tokens,
            "source": f"{model.name} seed_replay, {len(snippets)} snippets, {device_name()}, "
                      f"vllm {versions()['vllm']}, {time.strftime('%Y-%m-%d')}"}))
        result["summary_len_median"] = int(np.median([len(o.outputs[0].token_ids) for o in outs]))
        result["judge_len_median"] = float(np.median(judge_out_tokens))
    emit(result)


if __name__ == "__main__":
    main()
