"""Every prompt of the method, in one place, rendered to token ids.

Prompts are built here once, as token ids, and handed to whichever engine runs: both engines then see
exactly the same input (no double BOS, no template drift), and the prompt length is known before the
engine is called, so an over-long prompt is rejected instead of failing a whole batch. The corpus's and
the model's words in a prompt are plain text even where they spell a special token (`encode_ordinary`).

Two formats:
- `magicoder`: the paper's raw format (Magicoder/WizardCoder-style models): a system line, `@@ Instruction`,
  `@@ Response`. Summarize asks for "the problem description" of the response code; the response starts
  with a random opening such as "Write a python", which becomes the start of the instruction.
- `chat`: the same words, wrapped in the tokenizer's chat template (for chat models such as SmolLM2).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# The paper's system lines (official scripts: summarize uses the "responses to user instructions" one).
SYSTEM = (
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate "
    "and reliable responses to user instructions."
)
SUMMARIZE_ASK = "This is a response code snippet to a programming problem, please give the problem description:"
JUDGE_ASK = (
    "Here is a programming problem:\n{instruction}\n\n"
    "Here is the answer code to the problem:\n{code}\n"
    "Is the answer correct? Your reply should begin with Yes or No."
)
# The same question with the code first: the K judge prompts of a snippet then share the code as a prefix.
JUDGE_ASK_CODE_FIRST = (
    "Here is the answer code to a programming problem:\n{code}\n\n"
    "Here is the problem:\n{instruction}\n"
    "Is the answer correct? Your reply should begin with Yes or No."
)
# Evaluation (pipeline/evaluate/), in the style of Magicoder's evaluation: the problem in a python fence, the
# answer starting inside a python fence (HumanEval: already holding the function's signature and docstring).
EVAL_ASK = "Write a solution to the following problem:\n```python\n{problem}\n```"
EVAL_ANSWER_START = "```python\n"
# Openings of the generated instruction (official scripts); the language tag is appended when known.
PREFIXES = ("Write a", "Create a", "Implement a", "Develop a", "Design a", "Build a", "I want a")


def fenced(code: str, lang: str) -> str:
    """`code` as a Markdown block tagged `lang`, as the corpus had it. The fence is longer than any run of
    backticks opening a line of the code (code that quotes a ``` block came from a ```` fence)."""
    runs = re.findall(r"^[ ]*(`{3,})", code, re.MULTILINE)
    fence = "`" * max([3] + [len(run) + 1 for run in runs])
    return f"{fence}{lang}\n{code}\n{fence}"


def pick_prefix(snippet_id: str, lang: str) -> str:
    """A deterministic 'random' opening per snippet, so reruns and resumes write the same prompts."""
    choice = PREFIXES[int(hashlib.sha256(snippet_id.encode()).hexdigest(), 16) % len(PREFIXES)]
    return f"{choice} {lang}" if lang else choice


@dataclass
class PromptBuilder:
    tokenizer: Any
    prompt_format: str  # "chat" | "magicoder" | "auto"
    code_first: bool = False  # judge prompt order, see JudgeConfig.code_first

    def __post_init__(self) -> None:
        if self.prompt_format == "auto":
            self.prompt_format = "chat" if getattr(self.tokenizer, "chat_template", None) else "magicoder"

    def summarize(self, code: str, lang: str, prefix: str) -> list[int]:
        """Prompt whose continuation is the rest of an instruction that starts with `prefix`."""
        return self._render(f"{SUMMARIZE_ASK}\n{fenced(code, lang)}", answer_start=prefix)

    def judge(self, instruction: str, code: str, lang: str) -> list[int]:
        """Prompt whose first generated token is the Yes/No verdict."""
        return self.judge_all([instruction], code, lang)[0]

    def judge_all(self, instructions: list[str], code: str, lang: str) -> list[list[int]]:
        """The judge prompts of one snippet's candidates, tokenized in one batch call (the same ids as one
        by one, in ~60% of the time: they are built on the engine's loop thread while it waits)."""
        template = JUDGE_ASK_CODE_FIRST if self.code_first else JUDGE_ASK
        code = fenced(code, lang)
        return self._encode([self._text(template.format(instruction=i, code=code), "") for i in instructions])

    def instruct(self, instruction: str) -> list[int]:
        """Prompt for answering `instruction` (training's prompt half: the model learns to write the reply)."""
        return self._render(instruction, answer_start="")

    def solve(self, problem: str, answer_start: str = EVAL_ANSWER_START) -> list[int]:
        """Evaluation prompt: the model answers `problem`, its reply starting with `answer_start`."""
        return self._render(EVAL_ASK.format(problem=problem.strip()), answer_start=answer_start)

    def _render(self, user: str, answer_start: str) -> list[int]:
        return self._encode([self._text(user, answer_start)])[0]

    def _text(self, user: str, answer_start: str) -> tuple[str, list[str]]:
        """The prompt's text, and its parts that are ordinary text (see `encode_ordinary`)."""
        if self.prompt_format == "magicoder":  # no template tokens: all of it is ordinary text
            text = f"{SYSTEM}\n\n@@ Instruction\n{user}\n\n@@ Response\n{answer_start}"
            return text, [text]
        # The template already contains any BOS and its own system line (when it has a default one).
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return text + answer_start, [user, answer_start]

    def _encode(self, prompts: list[tuple[str, list[str]]]) -> list[list[int]]:
        # Raw magicoder text: the tokenizer adds BOS itself if the model uses one; a chat template has its own.
        return encode_ordinary(self.tokenizer, [text for text, _ in prompts], [parts for _, parts in prompts],
                               add_special_tokens=self.prompt_format == "magicoder")


# The tokenizers library's switch for "special-token strings are plain text" is one flag on the shared Rust
# tokenizer that transformers sets before each call; threads that encode at once must not interleave.
_ENCODE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """The tokenizer's special-token strings as one pattern (longest first), or None if it has none."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None


def encode_ordinary(tokenizer: Any, texts: list[str], ordinary: list[list[str]],
                    add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of `texts`, where the `ordinary` parts of each text (the corpus's or the model's words, in
    order) stay plain text even if they spell a special token: `<|endoftext|>` in a GPT-2 snippet, or
    `<filename>` in a usage line (a special token of StarCoder-family tokenizers). Parsed, such a string would
    become a control token in the prompt, and in training a token that decoding drops from the model's
    output; nanoGPT's `encode_ordinary` avoids the same. The template's own special tokens are parsed.

    A text whose ordinary parts hold no special-token string (nearly all) is tokenized as before, in one
    batch call. Otherwise the text is tokenized in pieces: the template's text parsed, the ordinary parts
    as plain text. Chat templates put the content after a newline or a special token, where one call's
    tokenizing splits too, so outside the spelled-out string the ids are one call's (tested for byte-level
    BPE, SmolLM2's; a SentencePiece tokenizer may add its word marker at a piece's start)."""
    pattern = special_token_pattern(tokenizer)
    with _ENCODE_LOCK:
        ids = [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
        if pattern is None:
            return ids
        for i, (text, parts) in enumerate(zip(texts, ordinary)):
            if any(pattern.search(part) for part in parts):
                ids[i] = _encode_in_pieces(tokenizer, text, parts, add_special_tokens)
    return ids


def _encode_in_pieces(tokenizer: Any, text: str, parts: list[str], add_special_tokens: bool) -> list[int]:
    pieces: list[tuple[str, bool]] = []  # (text, is ordinary)
    at = 0
    for part in filter(None, parts):
        start = text.find(part, at)
        if start < 0:  # some templates trim the content
            part = part.strip()
            start = text.find(part, at)
        if start < 0:  # the template changed it otherwise: keep the one-call ids, and say so
            log.warning("special-token text in a prompt part the template altered; it stays a special token")
            return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        pieces += [(text[at:start], False), (part, True)]
        at = start + len(part)
    pieces.append((text[at:], False))
    if add_special_tokens and pieces != [("", False), (text, True), ("", False)]:
        raise ValueError("add_special_tokens needs the whole text to be ordinary")
    ids: list[int] = []
    for piece, plain in pieces:
        if piece:
            ids += tokenizer(piece, add_special_tokens=add_special_tokens, split_special_tokens=plain)["input_ids"]
    return ids


def single_token_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """Ids of the spellings in `words` that are exactly one token (only those can be a first token)."""
    ids: list[int] = []
    for word in words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids
