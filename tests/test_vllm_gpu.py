"""The vLLM engine on a CUDA GPU (skipped without one; CI has none: results go to benchmarks/RESULTS.md).

The GPU path users run (tensor parallel size 1, compiled graphs, chunked prefill on), in float32: checked
against the transformers engine on the same token-id prompts of the embedded model. Float32, not the bf16 of
production runs, because bf16 rounding alone moves judge scores by more than the 0.02 the parity check allows
(transformers float32 vs bf16 on CPU, 48 judge prompts: max 0.070, mean 0.022); the bf16 figure on the GPU is
printed for the record.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import GenerateConfig, ModelConfig, SummarizeConfig
from pipeline.engines import yes_probability
from pipeline.extract import Snippet, extract_code
from pipeline.inverse import InverseInstruct
from pipeline.models import embedded_model_dir
from pipeline.prompts import PromptBuilder, single_token_ids

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
MAX_LEN = 2048


def gpu_config(engine: str, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(engine=engine, dtype=dtype, max_model_len=MAX_LEN, tensor_parallel_size=1,
                       gpu_memory_utilization=0.5, seed=0)


@pytest.fixture(scope="module")
def gpu_vllm():
    from pipeline.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(gpu_config("vllm"), str(embedded_model_dir()))
    assert engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 1
    yield engine
    engine.close()  # its GPU memory goes back before the next module's engines start


@pytest.fixture(scope="module")
def gpu_hf():
    from pipeline.engines.hf_engine import HFEngine

    return HFEngine(gpu_config("transformers"), str(embedded_model_dir()))


@pytest.fixture(scope="module")
def snippets(corpus) -> list[tuple[str, Snippet]]:
    found = []
    for row in corpus:
        s = extract_code(row["output"], GenerateConfig().extract)
        if isinstance(s, Snippet) and len(s.code) < 1200:
            found.append((row["instruction"], s))
        if len(found) == 8:
            return found
    return found


def test_judge_parity_with_transformers(gpu_vllm, gpu_hf, snippets):
    builder = PromptBuilder(gpu_vllm.tokenizer, "chat")
    prompts = [builder.judge(cand, s.code, s.lang) for i, (_, s) in enumerate(snippets)
               for cand in (snippets[i][0], snippets[(i + 1) % len(snippets)][0], "Write a poem about the sea.")]
    tok = gpu_vllm.tokenizer
    yes, no = single_token_ids(tok, GenerateConfig().judge.yes_words), single_token_ids(tok, GenerateConfig().judge.no_words)
    s_vllm = yes_probability(gpu_vllm.next_token_logprobs(prompts, yes + no), len(yes))
    s_hf = yes_probability(gpu_hf.next_token_logprobs(prompts, yes + no), len(yes))
    diff = float(np.max(np.abs(s_vllm - s_hf)))
    print(f"\nGPU float32 parity over {len(prompts)} judge prompts: max |score diff| = {diff:.4f}, "
          f"mean {float(np.mean(np.abs(s_vllm - s_hf))):.4f}")
    from pipeline.engines.hf_engine import HFEngine

    hf_bf16 = HFEngine(gpu_config("transformers", "bfloat16"), str(embedded_model_dir()))
    s_bf16 = yes_probability(hf_bf16.next_token_logprobs(prompts, yes + no), len(yes))
    print(f"bf16 rounding on the GPU (transformers bf16 vs float32): max |score diff| = "
          f"{float(np.max(np.abs(s_bf16 - s_hf))):.4f}, mean {float(np.mean(np.abs(s_bf16 - s_hf))):.4f}")
    assert diff < 0.02


def test_fused_batch_on_gpu_rejects_over_long_prompt_and_matches_step_by_step(gpu_vllm, snippets):
    rows = [("long", Snippet("x = 1\n" * 3000, "python"))] + [(f"s{i}", s) for i, (_, s) in enumerate(snippets[:6])]
    batch = pa.table({"id": [r[0] for r in rows], "source": ["t"] * len(rows), "source_index": list(range(len(rows))),
                      "code": [r[1].code for r in rows], "lang": [r[1].lang for r in rows]})
    out = {}
    for overlap in (True, False):
        cfg = GenerateConfig(model=gpu_config("vllm"), summarize=SummarizeConfig(num_candidates=4, max_new_tokens=48))
        cfg.compute.overlap = overlap
        out[overlap] = InverseInstruct(cfg, engine=gpu_vllm)(batch).to_pylist()
    for result in out.values():
        assert result[0]["reason"] == "prompt too long"
        assert all(r["reason"] is None and len(r["scores"]) == 4 for r in result[1:])
    # Per-snippet seeds give the same samples in both schedules unless GPU kernels that depend on the batch
    # shape flip a near-tie token (vLLM on GPUs is not batch-invariant), after which a sample goes its own
    # way; how often that happens is the GPU's business, not ours. Unseeded samples of up to 48 tokens at
    # temperature 0.8 would almost never agree, so a quarter agreeing shows both schedules use the seeds;
    # where the texts agree, so must the scores.
    same = [(f, p) for fr, pr in zip(out[True][1:], out[False][1:])
            for f, p in zip(zip(fr["instructions"], fr["scores"]), zip(pr["instructions"], pr["scores"])) if f[0] == p[0]]
    print(f"\nfused vs step-by-step on GPU: {len(same)}/24 candidates identical")
    assert len(same) >= 6
    np.testing.assert_allclose([f[1] for f, _ in same], [p[1] for _, p in same], atol=0.02)
