"""Why vLLM: the same fused summarize+judge work with the vLLM engine and with the transformers engine.

    python -m benchmarks.engines [--snippets 16] [--max-new-tokens 128]

Both engines behind the same interface (pipeline/engines), driven by the same actor code
(pipeline/inverse.py, no Ray here) on the embedded model with real weights, bf16 on a GPU. The
transformers engine samples one snippet at a time (its K samples as one batch: results then do not
depend on batch neighbours) and judges 16 prompts per forward pass.
"""

from __future__ import annotations

import argparse
import gc
import time

import pyarrow as pa

from benchmarks.common import K, emit, load_snippets, table


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snippets", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    return ap


def main() -> None:
    args = parser().parse_args()

    import torch

    from pipeline.config import GenerateConfig, ModelConfig, SummarizeConfig
    from pipeline.engines import create_engine
    from pipeline.inverse import InverseInstruct
    from pipeline.models import embedded_model_dir

    batch = pa.Table.from_pylist(load_snippets(args.snippets))
    results = []
    for engine_name in ("vllm", "transformers"):
        cfg = GenerateConfig(model=ModelConfig(engine=engine_name, max_model_len=4096),
                             summarize=SummarizeConfig(num_candidates=K, max_new_tokens=args.max_new_tokens))
        t0 = time.perf_counter()
        engine = create_engine(cfg.model, str(embedded_model_dir()))
        start_s = time.perf_counter() - t0
        actor = InverseInstruct(cfg, engine=engine)
        t0 = time.perf_counter()
        rows = actor(batch).to_pylist()
        secs = time.perf_counter() - t0
        tokens = sum(len(engine.tokenizer(t, add_special_tokens=False)["input_ids"])
                     for r in rows for t in r["instructions"])
        results.append({"variant": f"engine_{engine_name}", "model": "embedded", "snippets": len(rows),
                        "failed_snippets": sum(1 for r in rows if r["reason"]), "max_new_tokens": args.max_new_tokens,
                        "engine_start_s": round(start_s, 1), "steady_s": round(secs, 1),
                        "snippets_per_s": round(len(rows) / secs, 3), "output_tokens_per_s": round(tokens / secs, 1)})
        emit(results[-1])
        if hasattr(engine, "close"):  # vLLM's: stops its processes, removes their sockets
            engine.close()
        del actor, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # The answer to "why vLLM": both side by side, steady speed relative to the transformers engine.
    base = results[-1]["snippets_per_s"]
    print(table([{**r, "vs_transformers": round(r["snippets_per_s"] / base, 2)} for r in results],
                ["variant", "engine_start_s", "steady_s", "snippets_per_s", "output_tokens_per_s", "vs_transformers"]))


if __name__ == "__main__":
    main()
