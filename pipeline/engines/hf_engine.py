"""Plain Hugging Face transformers engine: for machines without vLLM, and the reference for parity."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ModelConfig
from pipeline.engines import SamplingSpec, resolve_dtype, usable_context

_JUDGE_BATCH = 16  # prompts per forward pass when reading first-token log-probabilities


class HFEngine:
    def __init__(self, cfg: ModelConfig, model_path: str) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, resolve_dtype(cfg, on_gpu=self.device == "cuda"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.max_model_len = usable_context(cfg, self.model.config)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], spec: SamplingSpec, seeds: list[int]) -> list[list[str]]:
        # One prompt at a time, its n samples as one batch: no padding, so a snippet's samples depend only
        # on its own seed, whatever else is in the batch (resumed runs reproduce uninterrupted ones).
        results = []
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            ids = torch.tensor([prompt] * spec.n, device=self.device)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=spec.temperature > 0,
                temperature=spec.temperature if spec.temperature > 0 else None,
                top_p=spec.top_p if spec.temperature > 0 else None,
                top_k=0 if spec.temperature > 0 else None,  # vLLM's default: no top-k cut
                repetition_penalty=spec.repetition_penalty,
                max_new_tokens=min(spec.max_new_tokens, self.max_model_len - len(prompt)),
                stop_strings=list(spec.stop) or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.pad_id,
            )
            texts = self.tokenizer.batch_decode(out[:, len(prompt) :], skip_special_tokens=True)
            results.append([_cut_at_stop(t, spec.stop) for t in texts])
        return results

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray:
        rows = []
        for start in range(0, len(prompts), _JUDGE_BATCH):
            chunk = prompts[start : start + _JUDGE_BATCH]
            width = max(len(p) for p in chunk)
            # Left padding with explicit positions: every prompt's last token sits in the last column.
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
            ).logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            rows.append(logprobs[:, token_ids].cpu().numpy())
        return np.concatenate(rows).astype(np.float32)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """HF includes the stop string in the output; vLLM does not. Cut it, to match."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
