"""Prompts: both formats, deterministic openings, Yes/No token ids."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.models import embedded_model_dir
from pipeline.prompts import (JUDGE_ASK, PREFIXES, SUMMARIZE_ASK, SYSTEM, PromptBuilder, _encode_in_pieces, fenced,
                              pick_prefix, single_token_ids)


def test_chat_format_ends_with_the_opening(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    builder = PromptBuilder(tok, "auto")
    assert builder.prompt_format == "chat"
    text = tok.decode(builder.summarize("print(1)", "python", "Write a python"))
    assert text.startswith("<|im_start|>user\n" + SUMMARIZE_ASK + "\n```python\nprint(1)\n```")
    assert text.endswith("<|im_start|>assistant\nWrite a python")


def test_magicoder_format_is_the_papers(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    builder = PromptBuilder(tok, "magicoder")
    text = tok.decode(builder.judge("Add two numbers.", "def add(a, b): return a + b", "python"),
                      skip_special_tokens=True)
    assert "@@ Instruction\nHere is a programming problem:\nAdd two numbers.\n\n" in text
    assert text.endswith("Is the answer correct? Your reply should begin with Yes or No.\n\n@@ Response\n")
    assert JUDGE_ASK.split("{")[0] in text


def test_prefix_is_deterministic_and_carries_the_language():
    assert pick_prefix("abc", "python") == pick_prefix("abc", "python")
    assert pick_prefix("abc", "python").endswith(" python")
    assert pick_prefix("abc", "") in PREFIXES
    assert len({pick_prefix(str(i), "") for i in range(200)}) == len(PREFIXES)


def test_single_token_ids_skip_multi_token_spellings(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = single_token_ids(tok, ["Yes", "Yes", "Yesterday-ish words"])
    assert ids == [tok.convert_tokens_to_ids("Yes")]


def test_code_first_judge_prompts_of_one_snippet_share_the_code_as_prefix(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    code = "def add(a, b):\n    return a + b\n" * 5
    first = PromptBuilder(tok, "chat", code_first=True)
    a, b = first.judge("Add two numbers.", code, "python"), first.judge("Sum a and b.", code, "python")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert tok.decode(a[:shared]).count("return a + b") == 5  # the whole code is in the shared prefix
    paper = PromptBuilder(tok, "chat")
    c, d = paper.judge("Add two numbers.", code, "python"), paper.judge("Sum a and b.", code, "python")
    assert next(i for i, (x, y) in enumerate(zip(c, d)) if x != y) < shared


def test_judge_prompts_tokenized_together_equal_each_tokenized_alone(corpus):
    """`judge_all` tokenizes a snippet's K prompts in one call; the ids must be those of each prompt alone
    (checked with the real SmolLM2 tokenizer on real instructions, against the template's own tokenizing)."""
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    code = "def add(a, b):\n    return a + b\n"
    instructions = [row["instruction"] for row in corpus[:10]]
    chat = PromptBuilder(tok, "chat").judge_all(instructions, code, "python")
    for ids, instruction in zip(chat, instructions):
        user = JUDGE_ASK.format(instruction=instruction, code=fenced(code, "python"))
        alone = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
        assert ids == list(alone)
    magicoder = PromptBuilder(tok, "magicoder").judge_all(instructions, code, "python")
    assert [len(ids) for ids in magicoder] != [len(magicoder[0])] * len(magicoder)  # really different lengths
    for ids, instruction in zip(magicoder, instructions):
        user = JUDGE_ASK.format(instruction=instruction, code=fenced(code, "python"))
        assert ids == tok(f"{SYSTEM}\n\n@@ Instruction\n{user}\n\n@@ Response\n")["input_ids"]


@pytest.mark.parametrize("fmt", ["chat", "magicoder"])
def test_special_token_strings_in_code_and_instructions_stay_text(fmt):
    """Code or an instruction that spells a special token (`<|endoftext|>`, `<|im_end|>`, or `<filename>` of
    SmolLM2's StarCoder-style vocabulary) is tokenized as text: the prompt holds only the template's special
    tokens, and decodes back to its text."""
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    builder = PromptBuilder(tok, fmt)
    code = 'tok.eos_token = "<|endoftext|>"\nprint("usage: prog <filename>")'
    instruction = "Set <|im_end|> as the end."
    specials = set(tok.all_special_ids)
    template_only = [i for i in builder.judge("Write a tool.", "x = 1", "python") if i in specials]
    ids = builder.judge(instruction, code, "python")
    assert [i for i in ids if i in specials] == template_only
    text, _ = builder._text(JUDGE_ASK.format(instruction=instruction, code=fenced(code, "python")), "")
    assert tok.decode(ids) == text
    summary = builder.summarize(code, "python", "Write a python")
    assert [i for i in summary if i in specials] == template_only
    text, _ = builder._text(f"{SUMMARIZE_ASK}\n{fenced(code, 'python')}", "Write a python")
    assert tok.decode(summary) == text


def test_tokenizing_in_pieces_gives_one_calls_ids(corpus):
    """The pieces (template parsed, ordinary parts as plain text) join into the ids of one call, so a prompt
    with a special-token string differs from the others only there (real SmolLM2 tokenizer, real code)."""
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    builder = PromptBuilder(tok, "chat")
    for row in corpus[:40]:
        user = f"{SUMMARIZE_ASK}\n{fenced(row['output'], 'python')}"
        text, parts = builder._text(user, "Write a python")
        assert _encode_in_pieces(tok, text, parts, add_special_tokens=False) == tok(text)["input_ids"]
