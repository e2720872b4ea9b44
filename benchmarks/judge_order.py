"""Judge prompt order: the paper's (instruction, then code) vs code first (shared cached prefix).

    .venv/bin/python -m benchmarks.judge_order [--snippets 16] [--k 5] [--engine vllm]

Generates K real candidates per snippet of the bundled corpus with the embedded model, then judges every
(candidate, code) pair in both orders with the same engine (prefix caching on). Reports judge time,
prompt tokens, Spearman correlation of the two orders' scores over all pairs, and how often both orders
select the same candidate. Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import spearman


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snippets", type=int, default=16)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    args = parser.parse_args()

    from pipeline.config import GenerateConfig, ModelConfig
    from pipeline.engines import SamplingSpec, create_engine, yes_probability
    from pipeline.extract import Snippet, extract_code
    from pipeline.io import EMBEDDED_CORPUS_PATH
    from pipeline.models import embedded_model_dir
    from pipeline.prompts import PromptBuilder, pick_prefix, single_token_ids
    from pipeline.select import best_candidate

    cfg = GenerateConfig(model=ModelConfig(engine=args.engine, dtype="float32", max_model_len=2048))
    engine = create_engine(cfg.model, str(embedded_model_dir()))
    rows = json.loads(EMBEDDED_CORPUS_PATH.read_text())
    snippets = [s for r in rows for s in [extract_code(r["output"], cfg.extract)]
                if isinstance(s, Snippet) and len(s.code) < 1500][: args.snippets]
    paper, code_first = PromptBuilder(engine.tokenizer, "chat"), PromptBuilder(engine.tokenizer, "chat", True)
    prefixes = [pick_prefix(str(i), s.lang) for i, s in enumerate(snippets)]
    spec = SamplingSpec(n=args.k, temperature=0.8, top_p=1.0, repetition_penalty=1.1, max_new_tokens=64, stop=("```",))
    texts = engine.sample([paper.summarize(s.code, s.lang, p) for s, p in zip(snippets, prefixes)], spec,
                          seeds=list(range(len(snippets))))
    pairs = [(i, (prefixes[i] + t).strip()) for i, ts in enumerate(texts) for t in ts]
    ids = single_token_ids(engine.tokenizer, cfg.judge.yes_words)
    no = single_token_ids(engine.tokenizer, cfg.judge.no_words)

    result: dict = {"engine": args.engine, "snippets": len(snippets), "k": args.k, "pairs": len(pairs)}
    scores = {}
    for name, builder in (("paper_order", paper), ("code_first", code_first)):
        prompts = [builder.judge(inst, snippets[i].code, snippets[i].lang) for i, inst in pairs]
        t0 = time.perf_counter()
        scores[name] = yes_probability(engine.next_token_logprobs(prompts, ids + no), len(ids))
        result[f"{name}_judge_s"] = round(time.perf_counter() - t0, 2)
        result[f"{name}_prompt_tokens"] = sum(map(len, prompts))
    result["spearman_all_pairs"] = round(spearman(scores["paper_order"], scores["code_first"]), 4)
    same = 0
    for i in range(len(snippets)):
        picks = [best_candidate(list(scores[n][i * args.k:(i + 1) * args.k])) for n in scores]
        same += picks[0] is not None and picks[1] is not None and picks[0].k == picks[1].k
    result["same_selection_rate"] = round(same / len(snippets), 3)
    result["judge_speedup_code_first"] = round(result["paper_order_judge_s"] / result["code_first_judge_s"], 2)
    print(json.dumps(result), flush=True)
    print("\n| order | judge s | prompt tokens |\n|---|---|---|")
    for name in scores:
        print(f"| {name} | {result[f'{name}_judge_s']} | {result[f'{name}_prompt_tokens']} |")
    print(f"\nSpearman (all {len(pairs)} pairs): {result['spearman_all_pairs']}; "
          f"same selected candidate: {result['same_selection_rate']:.0%} of {len(snippets)} snippets")


if __name__ == "__main__":
    main()
