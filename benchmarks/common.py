"""What the GPU benchmarks share: the same snippets, prompts, model shapes, output lengths and meters.

Every variant (seed_replay, ray_data_llm, factory, engines) runs on the same snippets of the bundled real
corpus, with the same summarize/judge prompt text (pipeline/prompts.py), so the only difference between
them is how they drive the engine.

Models: the embedded SmolLM2-135M-Instruct (real weights) and random-weight models of real shapes
(vLLM `load_format=dummy`: only config.json + the real SmolLM2 tokenizer are written). Speed does not
depend on weight values, but output LENGTH does: a random model never says EOS. So for random models
every summary is forced (`min_tokens = max_tokens = L`, no stop) to a length L drawn per snippet from
the lengths the embedded model really wrote in seed_replay (benchmarks/results/lengths-embedded.json), and every variant
gets the same L for the same snippet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

H100_BF16_PEAK_FLOPS = 790e12  # measured dense bf16 matmul peak of the lent H100 (issue 4)
# summarize max_new_tokens for every variant (instructions are prose, rarely longer); smaller for CPU smoke runs
SUMMARY_TOKENS_CAP = int(os.environ.get("BENCH_SUMMARY_TOKENS", 512))
JUDGE_MAX_TOKENS = 5  # the official scripts' judge generation length
JUDGE_TOP_LOGPROBS = 5  # ... and their top-k log-probabilities
CHUNK = 512  # the official scripts send prompts in synchronous chunks of this many
K = 10

SHAPES = {
    # ~1.5B Qwen2 shape (Qwen2.5-1.5B: 28 layers, d=1536, GQA 12/2 heads)
    "qwen2-1.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536,
                       intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       hidden_act="silu", max_position_embeddings=32768),
    # ~6.7B Llama shape (deepseek-coder-6.7b / the paper's InverseCoder-DS-6.7B: 32 layers, d=4096, MHA)
    "llama-6.7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, rope_theta=100000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       hidden_act="silu", max_position_embeddings=16384),
}


@dataclass
class Model:
    name: str
    path: str
    real: bool  # real weights (lengths are the model's own) or random (lengths forced)
    params: int
    load_format: str  # "auto" or "dummy"


def engine_defaults() -> dict:
    """vLLM settings every variant shares: bf16 and 0.9 of the GPU; on CPU (smoke runs) float32, 0.3 of RAM."""
    import torch

    if torch.cuda.is_available():
        return {"dtype": "bfloat16", "gpu_memory_utilization": 0.9}
    return {"dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True, "enable_chunked_prefill": False}


def embedded_dir() -> Path:
    from pipeline.models import embedded_model_dir

    return embedded_model_dir()


def build_model(name: str, workdir: Path) -> Model:
    """`embedded` or one of SHAPES; a shape gets a folder with config.json + the embedded tokenizer."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "embedded":
        path = embedded_dir()
        return Model(name, str(path), True, count_params(path), "auto")
    src, path = embedded_dir(), workdir / name
    path.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, path / f.name)
    base = json.loads((src / "config.json").read_text())
    config = {**SHAPES[name], "vocab_size": base["vocab_size"], "bos_token_id": base.get("bos_token_id"),
              "eos_token_id": base.get("eos_token_id"), "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return Model(name, str(path), False, count_params(path), "dummy")


def count_params(path: str | Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def load_snippets(n: int) -> list[dict]:
    """The first n distinct code snippets of the bundled corpus, as the preprocess stage extracts them."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import Snippet, extract_code
    from pipeline.io import EMBEDDED_CORPUS_PATH

    rows, seen, out = json.loads(EMBEDDED_CORPUS_PATH.read_text()), set(), []
    for i, row in enumerate(rows):
        found = extract_code(row["output"], ExtractConfig())
        if isinstance(found, Snippet) and found.code not in seen and len(found.code) < 6000:
            seen.add(found.code)
            out.append({"id": f"bench:{i}", "source": "bench", "source_index": i, "code": found.code,
                        "lang": found.lang})
    if len(out) < n:
        raise SystemExit(f"only {len(out)} snippets in the bundled corpus, asked for {n}")
    return out[:n]


def forced_length(snippet_id: str, lengths: list[int]) -> int:
    """A summary length for a random-weight model: the real length distribution, drawn by snippet id."""
    h = int(hashlib.sha256(snippet_id.encode()).hexdigest()[:8], 16)
    return max(1, int(lengths[h % len(lengths)]))


MEASURED_LENGTHS = Path(__file__).parent / "results" / "lengths-embedded.json"


def read_lengths() -> dict:
    """The embedded model's real output lengths (summary tokens per sample, judge tokens per prompt) that the
    random-weight models are forced to. Always the committed measurement, so that every step and session
    forces the same lengths (a step before and one after the embedded seed_replay stay comparable); the
    embedded seed_replay writes its own to WORKDIR/lengths.json, which gpu_session.sh brings back."""
    return json.loads(MEASURED_LENGTHS.read_text())


class GpuMemory:
    """Peak device memory in use (all processes: vLLM's engine core runs in its own), sampled every 0.2 s."""

    def __init__(self) -> None:
        import torch

        self._torch, self.peak, self._stop = torch, 0, threading.Event()
        self.available = torch.cuda.is_available()
        if self.available:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            free, total = self._torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.2)

    def stop(self) -> float | None:
        self._stop.set()
        return round(self.peak / 2**30, 1) if self.available else None


def mfu(params: int, tokens: int, seconds: float) -> float | None:
    """Model FLOPs utilisation of a forward pass over `tokens` (2 x params FLOPs per token)."""
    import torch

    if not torch.cuda.is_available() or seconds <= 0:
        return None
    return round(2.0 * params * tokens / seconds / H100_BF16_PEAK_FLOPS, 4)


def spearman(a, b) -> float:
    """Spearman's rho with tied values sharing their average rank (bf16 scores tie often)."""
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def _average_ranks(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def emit(result: dict) -> None:
    """One JSON line (the driver collects lines starting with RESULT), then a small table."""
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    print(table([result]), flush=True)


def table(rows: list[dict], keys: list[str] | None = None) -> str:
    keys = keys or [k for k in rows[0]]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


def versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    for mod in ("vllm", "ray", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out
