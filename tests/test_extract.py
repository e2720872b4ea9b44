"""Step 1 edge cases, on rows of the real bundled corpus where it has them."""

from __future__ import annotations

import pytest

from pipeline.config import ExtractConfig
from pipeline.extract import Rejection, Snippet, code_key, extract_code, first_fenced_block

CFG = ExtractConfig()


def test_first_of_several_blocks_with_its_language(corpus):
    # Row 14 explains a custom exception with a ```python block, then more blocks follow.
    response = corpus[14]["output"]
    assert response.count("```") >= 4
    got = extract_code(response, CFG)
    assert isinstance(got, Snippet)
    assert got.lang == "python"
    assert got.code.startswith("class CustomException(Exception):")
    assert "```" not in got.code
    assert got.code == response.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_block_without_language_tag(corpus):
    response = corpus[157]["output"]
    got = extract_code(response, CFG)
    assert isinstance(got, Snippet) and got.lang == ""
    assert got.code and "```" not in got.code


def test_unfenced_python_is_kept_whole_and_tagged_python(corpus):
    response = corpus[18]["output"]  # bare Python, no fence anywhere
    assert "```" not in response
    got = extract_code(response, CFG)
    assert got == Snippet(code=response.strip("\n"), lang="python")


def test_unfenced_prose_is_rejected_with_reason(corpus):
    prose = next(r["output"] for r in corpus if "```" not in r["output"] and r["output"].startswith("The "))
    got = extract_code(prose, CFG)
    assert isinstance(got, Rejection) and got.reason == "no code"


def test_unterminated_fence_keeps_all_code_including_last_character(corpus):
    # A real response cut inside its first block: the official script dropped the final character.
    full = corpus[14]["output"]
    cut = full[: full.index("super().__init__(self.message)") + len("super().__init__(self.message)")]
    got = extract_code(cut, CFG)
    assert isinstance(got, Snippet)
    assert got.code.endswith("super().__init__(self.message)")


def test_real_rows_with_an_unterminated_last_fence_still_take_the_first_block(corpus):
    for index in (570, 892):
        got = extract_code(corpus[index]["output"], CFG)
        assert isinstance(got, Snippet) and "```" not in got.code


def test_empty_block_and_length_limits():
    assert extract_code("```python\n```", CFG) == Rejection("empty code", "the first fenced code block is empty")
    short = extract_code("```python\nx=1\n```", ExtractConfig(min_code_chars=10))
    assert isinstance(short, Rejection) and short.reason == "code too short"
    giant = extract_code("```python\n" + "x = 1\n" * 10_000 + "```", ExtractConfig(max_code_chars=20_000))
    assert isinstance(giant, Rejection) and giant.reason == "code too long" and giant.detail.startswith("59999 chars")


def test_a_giant_unfenced_response_is_too_long_before_it_is_parsed(monkeypatch):
    """Parsing a 23 MB response took 15 s and 3.3 GB in a preprocess worker, only to reject it as too long."""
    import pipeline.extract

    monkeypatch.setattr(pipeline.extract, "parses_as_python", lambda text: pytest.fail("parsed"))
    giant = extract_code("x = 1\n" * 10_000, ExtractConfig(max_code_chars=20_000))
    assert giant == Rejection("code too long", "59999 chars > extract.max_code_chars=20000 (no fenced block: "
                                               "the whole response, not parsed)")


def test_empty_response_and_unfenced_disabled():
    assert extract_code("   \n", CFG).reason == "empty response"
    assert extract_code("print(1)", ExtractConfig(allow_unfenced_python=False)).reason == "no code"


def test_longer_fence_contains_shorter_one():
    text = "````markdown\n```python\nx = 1\n```\n````\nafter"
    assert first_fenced_block(text) == Snippet(code="```python\nx = 1\n```", lang="markdown")


def test_crlf_line_endings():
    """A corpus written on Windows: the closing fence line ends in \r; the code gets plain newlines."""
    text = "Here:\r\n```python\r\nx = 1\r\ny = 2\r\n```\r\nThis sets x.\r\n"
    assert extract_code(text, CFG) == extract_code(text.replace("\r\n", "\n"), CFG) == Snippet("x = 1\ny = 2", "python")
    assert extract_code("x = 1\r\nprint(x)\r\n", CFG) == Snippet("x = 1\nprint(x)", "python")
    assert first_fenced_block(text) == Snippet("x = 1\r\ny = 2", "python")  # as written (evaluation's use)


def test_indented_fence_and_info_string():
    text = "Steps:\n   ```js title=app.js\n   let a = 1;\n   ```\n"
    assert first_fenced_block(text) == Snippet(code="let a = 1;", lang="js")  # the fence's indent is not code


def test_a_fence_inside_a_list_item_is_a_block():
    """Indented by its list item (row 404 of the bundled corpus): the official script finds it too (any ```),
    and before it was `no code` here."""
    text = ("1. Use a comprehension:\n   - Example:\n     ```python\n     result = [\n         f(x)\n"
            "         for x in xs\n     ]\n     ```\n")
    assert first_fenced_block(text) == Snippet(code="result = [\n    f(x)\n    for x in xs\n]", lang="python")


def test_a_fence_deeper_than_the_opening_one_is_code():
    """A docstring showing Markdown: its ``` lines are indented more than 3 past the opening fence."""
    text = '```python\ndef f():\n    """Usage:\n\n    ```\n    f()\n    ```\n    """\n```\nDone.'
    assert first_fenced_block(text).code == 'def f():\n    """Usage:\n\n    ```\n    f()\n    ```\n    """'


def test_dedup_key_ignores_trailing_whitespace_only():
    assert code_key("def f():\n    return 1  \n\n") == code_key("def f():\n    return 1")
    assert code_key("def f():\n    return 1") != code_key("def f():\n  return 1")


def test_whole_corpus_is_processed_without_errors(corpus):
    results = [extract_code(r["output"], CFG) for r in corpus]
    kept = [r for r in results if isinstance(r, Snippet)]
    # README of the data: 1,140 outputs hold a fenced block; unfenced Python adds a few hundred more.
    assert 1140 <= len(kept) < len(corpus)
    assert all(r.code.strip() for r in kept)
