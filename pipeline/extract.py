"""Step 1, preprocess: pull the code out of each response, or say why not.

The paper's rule: the code is the FIRST fenced block of the response, with its language tag; a response
with no fence is kept only if the whole response parses as Python (then tagged python). Unlike the
official script we keep the last character of an unterminated fence's code (its slicing dropped it).
"""

from __future__ import annotations

import ast
import hashlib
import re
import warnings
from dataclasses import dataclass

from pipeline.config import ExtractConfig

# An opening fence: 3+ backticks at the start of a line, then an optional info string whose first word is
# the language. Any indent: a fence inside a list item is indented by the item's ("   - Example:\n     ```").
_OPEN = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,})[ \t]*(?P<info>[^`\n]*)$", re.MULTILINE)


@dataclass(frozen=True)
class Snippet:
    code: str
    lang: str


@dataclass(frozen=True)
class Rejection:
    reason: str  # short, from a small vocabulary, counted in the manifest
    detail: str  # specifics for a human reading the rejected table


def extract_code(response: str, cfg: ExtractConfig) -> Snippet | Rejection:
    """The first fenced block of `response`, or the whole response if it is Python, else a Rejection."""
    response = response.replace("\r\n", "\n")  # the code of a CRLF corpus row gets plain newlines too
    snippet = first_fenced_block(response)
    if snippet is None:
        if not cfg.allow_unfenced_python:
            return Rejection("no code", "the response has no fenced code block")
        if not response.strip():
            return Rejection("empty response", "the response is empty or whitespace")
        n = len(response.strip("\n"))
        if n > cfg.max_code_chars:  # before parsing: ast.parse of a 23 MB response took 15 s and 3.3 GB
            return Rejection("code too long", f"{n} chars > extract.max_code_chars={cfg.max_code_chars} "
                                              f"(no fenced block: the whole response, not parsed)")
        if not parses_as_python(response):
            return Rejection("no code", "no fenced code block, and the response does not parse as Python")
        snippet = Snippet(code=response.strip("\n"), lang="python")
    if not snippet.code.strip():
        return Rejection("empty code", "the first fenced code block is empty")
    n = len(snippet.code)
    if n < cfg.min_code_chars:
        return Rejection("code too short", f"{n} chars < extract.min_code_chars={cfg.min_code_chars}")
    if n > cfg.max_code_chars:
        return Rejection("code too long", f"{n} chars > extract.max_code_chars={cfg.max_code_chars}")
    return snippet


def first_fenced_block(text: str) -> Snippet | None:
    """The first ``` block: its body and language tag; an unterminated fence runs to the end. As in
    CommonMark, the body loses up to the opening fence's indent from each line, and the closing fence may
    be indented up to 3 spaces more than the opening one (a ``` indented deeper is part of the code)."""
    opening = _OPEN.search(text)
    if opening is None:
        return None
    fence, indent = opening.group("fence"), len(opening.group("indent"))
    info = opening.group("info").strip()
    lang = info.split()[0].lower() if info else ""
    body_start = opening.end() + 1  # skip the newline that ends the fence line
    # The closing fence: at least as many backticks, alone on its line (which may end in \r: CRLF text).
    closing = re.compile(rf"^[ ]{{0,{indent + 3}}}`{{{len(fence)},}}[ \t\r]*$", re.MULTILINE).search(text, body_start)
    body = text[body_start : closing.start() if closing else len(text)]
    if indent:
        body = re.sub(rf"(?m)^[ ]{{1,{indent}}}", "", body)
    return Snippet(code=body.rstrip(), lang=lang)


def parses_as_python(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in prose is not our business
            ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def code_key(code: str) -> str:
    """Key for exact dedup: identical code up to trailing whitespace on lines and around the block."""
    normalized = "\n".join(line.rstrip() for line in code.strip().splitlines())
    return hashlib.sha256(normalized.encode("utf-8", "surrogatepass")).hexdigest()
