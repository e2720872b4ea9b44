"""Mix schedule, prompt format and response-only labels, packing (pipeline/train/data.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.config import TrainConfig, load_config
from pipeline.prompts import PromptBuilder
from pipeline.train.data import IGNORE, Collate, mix_schedule, pack_batch, tokenize_batch
from pipeline.train.trainer import plan_phases, steps_per_pass


@pytest.mark.parametrize("kind, expected", [
    ("generated-then-original", [("generated",), ("original",), ("original",)]),
    ("original-then-generated", [("original",), ("original",), ("generated",)]),
    ("mixed", [("generated", "original"), ("original",)]),
])
def test_mix_schedule_order_and_epoch_counts(kind, expected):
    phases = mix_schedule(kind, generated_epochs=1, original_epochs=2)
    assert phases == expected
    assert sum(p.count("generated") for p in phases) == 1 and sum(p.count("original") for p in phases) == 2


def test_default_schedule_is_the_papers_and_drops_a_missing_source():
    cfg = load_config(overrides={"data.generated": "x/selected"}, schema=TrainConfig)
    assert plan_phases(cfg) == [("generated",), ("original",), ("original",)]
    assert plan_phases(load_config(schema=TrainConfig)) == [("original",), ("original",)]
    assert mix_schedule("mixed", 3, 1) == [("generated", "original"), ("generated",), ("generated",)]


def test_steps_per_pass_follow_the_equal_split_and_accumulation():
    assert steps_per_pass(25, world=2, micro=2, accum=2) == 3  # 12 rows/worker -> 6 micro -> 3 steps
    assert steps_per_pass(1, world=2, micro=2, accum=1) == 0


def _rows(rows: list[dict]) -> pa.Table:
    base = {"id": None, "source": "s", "source_index": 0, "instruction": None, "response": None,
            "reason": None, "detail": None}
    return pa.Table.from_pylist([{**base, "id": f"r{i}", **r} for i, r in enumerate(rows)])


@pytest.mark.parametrize("fmt", ["chat", "magicoder"])
def test_only_response_tokens_are_trained_and_the_prompt_is_generations(tiny_model, fmt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    instruction, response = "Write a python function that adds two numbers.", "def add(a, b):\n    return a + b"
    out = tokenize_batch(_rows([{"instruction": instruction, "response": response}]), tiny_model, fmt, 512)
    ids, labels = out["input_ids"][0].as_py(), out["labels"][0].as_py()
    prompt = PromptBuilder(tok, fmt).instruct(instruction)  # what generate prompts with
    assert out["status"][0].as_py() == "ok" and len(ids) == len(labels)
    assert ids[:len(prompt)] == prompt
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)  # every prompt token is masked
    assert labels[len(prompt):] == ids[len(prompt):]  # every response token is trained
    answer = tok.decode(ids[len(prompt):])
    assert answer.startswith(response) and answer != response  # ends with the end-of-turn / EOS token


@pytest.mark.parametrize("fmt", ["chat", "magicoder"])
def test_special_token_strings_in_a_pair_are_trained_as_text(tiny_model, fmt):
    """A response that spells the end-of-turn token must not teach the model to end its turn mid-code
    (nor, for `<|endoftext|>`, to write a token that decoding drops): both stay text; only the real end
    token is a special id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    instruction, response = "Split on <|endoftext|>.", 'docs = text.split("<|endoftext|>")\nend = "<|im_end|>"'
    out = tokenize_batch(_rows([{"instruction": instruction, "response": response}]), tiny_model, fmt, 512)
    ids = out["input_ids"][0].as_py()
    plain = tokenize_batch(_rows([{"instruction": "a", "response": "b"}]), tiny_model, fmt, 512)["input_ids"][0].as_py()
    special_ids = set(tok.all_special_ids)
    specials = [i for i in ids if i in special_ids]
    assert specials == [i for i in plain if i in special_ids] and specials[-1] == tok.eos_token_id
    assert instruction in tok.decode(ids) and response in tok.decode(ids)


def test_bad_and_long_rows_get_a_status_not_a_crash(tiny_model):
    long_prompt = "word " * 400
    out = tokenize_batch(_rows([
        {"reason": "missing field: response", "detail": "no `response`"},
        {"instruction": " ", "response": "x = 1"},
        {"instruction": long_prompt, "response": "x = 1"},
        {"instruction": "Write code.", "response": "x = 1\n" * 200},
        {"instruction": "Write code.", "response": "x = 1"},
    ]), tiny_model, "chat", 64)
    assert out["status"].to_pylist() == ["read: missing field: response", "empty instruction or response",
                                         "prompt too long", "truncated", "ok"]
    assert [len(x) for x in out["input_ids"].to_pylist()] == [0, 0, 0, 64, out["n_tokens"][4].as_py()]


def _examples(tiny_model: str, n: int = 4, max_length: int = 512) -> pa.Table:
    texts = [("Write a python function " + "that sorts a list " * i, "def f(x):\n    return sorted(x)" + "  # ok" * i)
             for i in range(1, n + 1)]
    return tokenize_batch(_rows([{"instruction": a, "response": b} for a, b in texts]), tiny_model, "chat", max_length)


def test_packing_fills_sequences_and_restarts_positions(tiny_model):
    tokenized = _examples(tiny_model, n=6)
    lengths = tokenized["n_tokens"].to_pylist()
    packed = pack_batch(tokenized, max_length=2 * max(lengths), packing=True)
    assert packed.num_rows < len(lengths) and sum(packed["n_examples"].to_pylist()) == len(lengths)
    for ids, labels, pos in zip(*(packed[c].to_pylist() for c in ("input_ids", "labels", "position_ids"))):
        assert len(ids) == len(labels) == len(pos) <= 2 * max(lengths)
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert all(labels[s] == IGNORE for s in starts)  # never predict across a boundary
    unpacked = pack_batch(tokenized, max_length=2 * max(lengths), packing=False)
    assert unpacked["n_examples"].to_pylist() == [1] * len(lengths)


def test_packed_logits_and_loss_equal_the_unpacked_ones(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenized = _examples(tiny_model, n=3)
    packed_rows = pack_batch(tokenized, max_length=4096, packing=True)
    assert packed_rows.num_rows == 1 and packed_rows["n_examples"][0].as_py() == 3
    single = pack_batch(tokenized, max_length=4096, packing=False)
    packed = Collate(pad_id=0, packed=True)({c: packed_rows[c].to_pylist() for c in packed_rows.column_names})
    assert "attention_mask" not in packed
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packed sequences.
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        packed_loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            labels=packed["labels"], num_items_in_batch=1.0, use_cache=False).loss
        # Control: the same tokens with one running position (no restarts) do attend across examples.
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        offset, unpacked_loss, leak = 0, 0.0, 0.0
        for i in range(single.num_rows):
            row = Collate(pad_id=0, packed=False)({c: single[c].to_pylist()[i:i + 1] for c in single.column_names})
            alone = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(logits[offset:offset + n], alone, atol=1e-4, rtol=1e-4)
            unpacked_loss += float(model(**{k: v for k, v in row.items() if k != "num_tokens"},
                                         num_items_in_batch=1.0).loss)
            leak = max(leak, float((leaky[offset:offset + n] - alone).abs().max()))
            offset += n
    assert abs(float(packed_loss) - unpacked_loss) < 1e-3 * unpacked_loss
    assert leak > 1e-3  # the test can tell attention leaking across examples


def test_padded_batch_has_an_attention_mask_and_ignored_padding(tiny_model):
    rows = pack_batch(_examples(tiny_model, n=2), max_length=4096, packing=False)
    batch = Collate(pad_id=0, packed=False)({c: rows[c].to_pylist() for c in rows.column_names})
    lengths = rows["input_ids"].to_pylist()
    short = min(range(2), key=lambda i: len(lengths[i]))
    assert batch["attention_mask"][short].sum() == len(lengths[short])
    assert (batch["labels"][short, len(lengths[short]):] == IGNORE).all()
    assert batch["num_tokens"] == sum(len(x) for x in lengths)
