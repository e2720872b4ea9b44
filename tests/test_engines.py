"""The score formula and the transformers engine (on the tiny random model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.engines import SamplingSpec, yes_probability
from pipeline.engines.hf_engine import HFEngine


def test_score_is_p_yes_over_p_yes_plus_p_no():
    lp = np.log(np.array([[0.6, 0.2], [0.01, 0.04], [0.5, 0.5]], dtype=np.float32))
    np.testing.assert_allclose(yes_probability(lp, num_yes=1), [0.75, 0.2, 0.5], rtol=1e-6)


def test_spellings_are_summed_per_side_in_float32():
    # Yes-side spellings 0.3 + 0.1, No-side 0.2 + 0.2  ->  0.4 / 0.8
    lp = np.log(np.array([[0.3, 0.1, 0.2, 0.2]], dtype=np.float64))
    score = yes_probability(lp, num_yes=2)
    assert score.dtype == np.float32 and math.isclose(float(score[0]), 0.5, rel_tol=1e-6)


def test_tiny_probabilities_do_not_underflow():
    lp = np.array([[-200.0, -201.0]], dtype=np.float32)  # exp() underflows float32; the odds do not
    assert math.isclose(float(yes_probability(lp, 1)[0]), 1 / (1 + math.exp(-1)), rel_tol=1e-5)


def test_missing_tokens():
    lp = np.array([[-1.0, -np.inf], [-np.inf, -np.inf]], dtype=np.float32)
    scores = yes_probability(lp, 1)
    assert scores[0] == 1.0 and np.isnan(scores[1])


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    return HFEngine(ModelConfig(engine="transformers", dtype="float32", max_model_len=512), tiny_model)


def test_batched_logprobs_equal_one_prompt_at_a_time(hf_engine):
    tok = hf_engine.tokenizer
    prompts = [tok("def add(a, b): return a + b")["input_ids"], tok("x = 1")["input_ids"],
               tok("print('hello world') # a longer prompt than the others")["input_ids"]]
    ids = [tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")]
    batched = hf_engine.next_token_logprobs(prompts, ids)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = hf_engine.model(torch.tensor([prompt])).logits[0, -1].float()
        expected = torch.log_softmax(logits, -1)[ids].numpy()
        np.testing.assert_allclose(batched[row], expected, atol=1e-4)


def test_sampling_is_seeded_per_prompt_and_stops_at_fence(hf_engine):
    tok = hf_engine.tokenizer
    spec = SamplingSpec(n=3, temperature=0.8, top_p=1.0, repetition_penalty=1.1, max_new_tokens=12, stop=("```",))
    prompts = [tok("Write a function")["input_ids"], tok("Create a class")["input_ids"]]
    first = hf_engine.sample(prompts, spec, seeds=[1, 2])
    alone = hf_engine.sample(prompts[1:], spec, seeds=[2])
    assert len(first) == 2 and all(len(texts) == 3 for texts in first)
    assert first[1] == alone[0]  # a prompt's samples do not depend on its batch neighbours
    assert all("```" not in t for texts in first for t in texts)
