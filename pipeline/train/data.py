"""Training data: the mix schedule, the prompt format, tokenization and packing (all in Ray Data).

An example is (instruction, response) rendered exactly as `generate` prompts the model
(`pipeline/prompts.py`: the tokenizer's chat template, or the paper's raw @@ Instruction/@@ Response),
followed by the response and an end token. Only the response tokens are trained (prompt labels = -100).

Packing concatenates examples into sequences of up to `max_length` tokens. Each example keeps its own
position ids (0, 1, ... from its first token), and no attention mask is passed: transformers then builds a
block-diagonal causal mask from the position-id restarts (`masking_utils.find_packed_sequence_indices`),
so an example never attends to its neighbours (tests/test_train_data.py checks logits and loss against
the unpacked examples).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.models import resolve_model_path
from pipeline.prompts import PromptBuilder, encode_ordinary

IGNORE = -100  # label of a token that is not trained (the loss functions' ignore_index)
KEPT = ("ok", "truncated")  # statuses of examples that are trained
Phase = tuple[str, ...]


def mix_schedule(kind: str, generated_epochs: int, original_epochs: int) -> list[Phase]:
    """Passes over the data, in order; each pass is the sources it shuffles together.

    `mixed`: pass e holds every source that still has epochs left at e, so each source is seen exactly
    its number of epochs whatever the schedule."""
    gen: list[Phase] = [("generated",)] * generated_epochs
    orig: list[Phase] = [("original",)] * original_epochs
    if kind == "generated-then-original":
        return gen + orig
    if kind == "original-then-generated":
        return orig + gen
    if kind == "mixed":
        counts = (("generated", generated_epochs), ("original", original_epochs))
        return [tuple(s for s, n in counts if e < n) for e in range(max(generated_epochs, original_epochs))]
    raise ValueError(f"unknown schedule {kind!r}")


def resolve_prompt_format(tokenizer: Any, prompt_format: str) -> str:
    return PromptBuilder(tokenizer, prompt_format).prompt_format  # "auto" -> what generation uses


def encode_example(tokenizer: Any, prompt_format: str, instruction: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (as generation renders it) and of the response (with its end token).
    The instruction and response are ordinary text: a special-token string in them is spelled out."""
    builder = PromptBuilder(tokenizer, prompt_format)
    prompt = builder.instruct(instruction)
    if builder.prompt_format == "magicoder":
        return prompt, encode_ordinary(tokenizer, [response], [[response]])[0] + [tokenizer.eos_token_id]
    user = [{"role": "user", "content": instruction}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    # The template's own end-of-turn text is part of what the model must learn to write; a template
    # that does not extend the prompt (rare) gets the response plus the EOS token instead.
    tail = full[len(prompt_text):] if full.startswith(prompt_text) else None
    if tail is None:
        answer = encode_ordinary(tokenizer, [response], [[response]])[0] + [tokenizer.eos_token_id]
    else:
        answer = encode_ordinary(tokenizer, [tail], [[response]])[0]
    return prompt, answer


_TOKENIZERS: dict[tuple[str, bool], Any] = {}


def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    # One load per Ray worker process, reused by every batch it maps; `path` is resolved on this node, without
    # a remote model's weights (a CPU node that tokenizes needs none of them).
    key = (path, trust_remote_code)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        local = resolve_model_path(path, weights=False)
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    return _TOKENIZERS[key]


TOKENIZED = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                       ("status", pa.string()), ("n_tokens", pa.int64())])


def tokenize_batch(batch: pa.Table, model_path: str, prompt_format: str, max_length: int,
                   trust_remote_code: bool = False) -> pa.Table:
    """Rows from `pipeline.io.read_corpus` -> token ids + labels, and a status for the run's counts:
    `ok`, `truncated` (kept, cut at max_length), or why the row is dropped."""
    tokenizer = _tokenizer(model_path, trust_remote_code)
    out: dict[str, list] = {name: [] for name in TOKENIZED.names}
    for row in batch.to_pylist():
        ids: list[int] = []
        labels: list[int] = []
        if row.get("reason"):
            status = f"read: {row['reason']}"
        elif not row["instruction"].strip() or not row["response"].strip():
            status = "empty instruction or response"
        else:
            prompt, answer = encode_example(tokenizer, prompt_format, row["instruction"], row["response"])
            if len(prompt) >= max_length:
                status = "prompt too long"
            else:
                ids = (prompt + answer)[:max_length]
                labels = ([IGNORE] * len(prompt) + answer)[:max_length]
                status = "truncated" if len(prompt) + len(answer) > max_length else "ok"
        out["id"].append(row["id"])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["n_tokens"].append(len(ids))
    return pa.Table.from_pydict(out, schema=TOKENIZED)


PACKED = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                    ("position_ids", pa.list_(pa.int32())), ("n_examples", pa.int32())])


def pack_batch(batch: pa.Table, max_length: int, packing: bool) -> pa.Table:
    """Tokenized rows -> training sequences (dropped rows are left out). Packing is greedy in row order within a batch; each
    example's first label is IGNORE, so no token is ever predicted across an example boundary."""
    out: dict[str, list] = {name: [] for name in PACKED.names}
    current: list[dict[str, Any]] = []

    def flush() -> None:
        if not current:
            return
        out["id"].append(hashlib.sha256("\x00".join(e["id"] for e in current).encode()).hexdigest()[:20])
        out["input_ids"].append([t for e in current for t in e["input_ids"]])
        out["labels"].append([t for e in current for t in [IGNORE] + e["labels"][1:]])
        out["position_ids"].append([p for e in current for p in range(len(e["input_ids"]))])
        out["n_examples"].append(len(current))
        current.clear()

    used = 0
    batch = batch.filter(pc.is_in(batch["status"], value_set=pa.array(KEPT)))
    for example in batch.select(["id", "input_ids", "labels"]).to_pylist():
        if current and (not packing or used + len(example["input_ids"]) > max_length):
            flush()
            used = 0
        current.append(example)
        used += len(example["input_ids"])
    flush()
    return pa.Table.from_pydict(out, schema=PACKED)


@dataclass
class Collate(NumpyBatchCollateFn):
    """A batch of sequences (numpy, from Ray Data) -> right-padded tensors for the model.

    Packed: no attention mask (the model derives the per-example mask from position ids; a padding tail
    is its own segment). Padded baseline: the usual attention mask. The sequence ids travel along (not to
    the model) so that a step's data can be audited and compared across a resume."""

    pad_id: int
    packed: bool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        rows = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab, pos) in enumerate(zip(rows, batch["labels"], batch["position_ids"])):
            n = len(ids)
            input_ids[i, :n] = torch.from_numpy(ids)
            labels[i, :n] = torch.from_numpy(np.asarray(lab, dtype=np.int64))
            position_ids[i, :n] = torch.from_numpy(np.asarray(pos, dtype=np.int64))
            position_ids[i, n:] = torch.arange(width - n)
            attention_mask[i, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "num_tokens": int(attention_mask.sum()), "ids": [str(x) for x in batch["id"]]}
        if not self.packed:
            out["attention_mask"] = attention_mask
        return out
