"""Building the judge prompts: K prompts of a snippet tokenized one by one vs in one batch call.

    .venv/bin/python -m benchmarks.judge_prompts [--snippets 200] [--k 10] [--repeats 3]

The factory builds a snippet's K judge prompts on the engine-loop thread as soon as its samples are done,
so this time is taken from the thread that feeds the engine. Real snippets of the bundled corpus, their
real instructions as the K candidates, the embedded model's tokenizer and chat template; the best of
`--repeats` runs. Checks that both ways give the same ids. Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import emit, load_snippets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snippets", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.io import EMBEDDED_CORPUS_PATH
    from pipeline.models import embedded_model_dir
    from pipeline.prompts import PromptBuilder

    builder = PromptBuilder(AutoTokenizer.from_pretrained(str(embedded_model_dir())), "chat")
    snippets = load_snippets(args.snippets)
    rows = json.loads(EMBEDDED_CORPUS_PATH.read_text())
    candidates = [[rows[(s["source_index"] + k) % len(rows)]["instruction"] for k in range(args.k)] for s in snippets]

    def one_by_one() -> list:
        return [[builder.judge(c, s["code"], s["lang"]) for c in cands] for s, cands in zip(snippets, candidates)]

    def batched() -> list:
        return [builder.judge_all(cands, s["code"], s["lang"]) for s, cands in zip(snippets, candidates)]

    result: dict = {"snippets": len(snippets), "k": args.k}
    built = {}
    for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            built[name] = fn()
            best = min(best, time.perf_counter() - t0)
        result[f"{name}_ms_per_snippet"] = round(1e3 * best / len(snippets), 2)
    result["same_ids"] = built["one_by_one"] == built["batched"]
    result["speedup"] = round(result["one_by_one_ms_per_snippet"] / result["batched_ms_per_snippet"], 2)
    emit(result)
    if not result["same_ids"]:
        raise SystemExit("batched judge prompts differ from one-by-one ones")


if __name__ == "__main__":
    main()
