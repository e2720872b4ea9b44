"""vLLM engine start and summarize throughput on this machine's CPU, per core-binding setting.

    .venv/bin/python benchmarks/vllm_cpu_settings.py [--prompts 8] [--n 10] [--max-new-tokens 64]

Each setting runs in a fresh process (vLLM reads its CPU binding from the environment at start). Prints
one JSON line per setting, then a table. The embedded model, float32, real corpus snippets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "vllm default (one core kept for the frontend)": {"VLLM_CPU_OMP_THREADS_BIND": "auto",
                                                      "VLLM_CPU_NUM_OF_RESERVED_CPU": ""},
    "all cores bound (our default on <= 4 cores)": {},
}


def measure(prompts: int, n: int, max_new_tokens: int) -> dict:
    from pipeline.config import ExtractConfig, ModelConfig
    from pipeline.engines import SamplingSpec
    from pipeline.engines.vllm_engine import VLLMEngine
    from pipeline.extract import Snippet, extract_code
    from pipeline.io import EMBEDDED_CORPUS_PATH
    from pipeline.models import embedded_model_dir
    from pipeline.prompts import PromptBuilder, pick_prefix

    t0 = time.perf_counter()
    engine = VLLMEngine(ModelConfig(dtype="float32", max_model_len=2048), str(embedded_model_dir()))
    start_s = time.perf_counter() - t0
    builder = PromptBuilder(engine.tokenizer, "chat")
    rows = json.loads(EMBEDDED_CORPUS_PATH.read_text())
    snippets = [s for r in rows for s in [extract_code(r["output"], ExtractConfig(max_code_chars=1500))]
                if isinstance(s, Snippet)][:prompts]
    batch = [builder.summarize(s.code, s.lang, pick_prefix(str(i), s.lang)) for i, s in enumerate(snippets)]
    spec = SamplingSpec(n=n, temperature=0.8, top_p=1.0, repetition_penalty=1.1, max_new_tokens=max_new_tokens,
                        stop=("```",))
    t0 = time.perf_counter()
    texts = engine.sample(batch, spec, seeds=list(range(len(batch))))
    gen_s = time.perf_counter() - t0
    tokens = sum(len(engine.tokenizer(t, add_special_tokens=False)["input_ids"]) for ts in texts for t in ts)
    return {"engine_start_s": round(start_s, 1), "generate_s": round(gen_s, 1), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / gen_s, 1), "prompts": len(batch), "n": n,
            "prompt_tokens_mean": round(sum(map(len, batch)) / len(batch), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.prompts, args.n, args.max_new_tokens)), flush=True)
        return
    results = []
    for name, env in SETTINGS.items():
        child_env = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
        proc = subprocess.run([sys.executable, __file__, "--child", "--prompts", str(args.prompts), "--n",
                               str(args.n), "--max-new-tokens", str(args.max_new_tokens)],
                              env=child_env, capture_output=True, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        result = {"setting": name, "cpus": os.cpu_count(), **json.loads(line[len("RESULT "):])}
        print(json.dumps(result), flush=True)
        results.append(result)
    print("\n| setting | engine start (s) | generate (s) | output tok/s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['engine_start_s']} | {r['generate_s']} | {r['output_tokens_per_s']} |")


if __name__ == "__main__":
    main()
