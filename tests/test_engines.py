"""The score formula, the transformers engine (on the tiny random model), and the engine actors: what a dead
engine does to its actor, how a retired actor stops its engine, and which vLLM log level it gets."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ComputeConfig, GenerateConfig, ModelConfig
from pipeline.crash_isolation import CrashIsolation, job_ledger
from pipeline.engines import EngineDead, SamplingSpec, restart_actor_if_engine_dead, yes_probability
from pipeline.engines.hf_engine import HFEngine
from pipeline.evaluate.run import Completer
from pipeline.ray_setup import actor_pool
from pipeline.inverse import InverseInstruct
from tests.process_tools import still_running


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


def test_max_model_len_is_capped_at_the_models_own_context(tiny_model, caplog):
    """A longer model.max_model_len (the 4,096 default, a 2,048-token model) would run past the positions the
    model knows; vLLM refuses it. Both engines use the model's length then, and say so."""
    from pipeline.engines import context_limit_text

    cfg = ModelConfig(engine="transformers", dtype="float32", max_model_len=8192)
    with caplog.at_level("WARNING"):
        engine = HFEngine(cfg, tiny_model)  # its config.json: max_position_embeddings 4096
    assert engine.max_model_len == 4096
    assert "model.max_model_len=8192 is more than this model's context length, 4096" in caplog.text
    assert context_limit_text(cfg, engine) == "the model's context length 4096 (model.max_model_len=8192 capped)"
    shorter = ModelConfig(engine="transformers", dtype="float32", max_model_len=1024)
    engine = HFEngine(shorter, tiny_model)
    assert engine.max_model_len == 1024 and context_limit_text(shorter, engine) == "model.max_model_len=1024"


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


def _engine_that_marks_close() -> type:
    """An "engine" that writes to a file when closed, after `close_s` (made in a function, see below)."""

    class MarksClose:
        def __init__(self, marker: str, close_s: float = 0.0) -> None:
            self.marker, self.close_s = marker, close_s

        def close(self) -> None:
            time.sleep(self.close_s)
            with open(self.marker, "a") as f:
                f.write("closed ")

    return MarksClose


def _engine_dies_every_call() -> type:
    """A map_batches actor whose engine is dead on every call; it counts its calls in a file. Made in a
    function so that Ray pickles the class by value (Ray workers cannot import a pytest module)."""
    marks_close = _engine_that_marks_close()

    class EngineDiesEveryCall:
        def __init__(self, calls: str) -> None:
            self.calls = calls
            self.engine, self.owns_engine = marks_close(calls + ".closed"), True

        @restart_actor_if_engine_dead
        def __call__(self, batch):
            with open(self.calls, "a") as f:
                f.write("x")
            raise EngineDead("the engine core died")

    return EngineDiesEveryCall


def test_a_dead_engine_restarts_its_actor_a_bounded_number_of_times(ray_local, tmp_path):
    """EngineDead ends the actor's process (not an application error, which Ray Data would not retry);
    Ray restarts it `compute.max_actor_restarts` times and then fails the job instead of looping. Each
    actor closes its dead engine first (a vLLM engine core's shared memory, see VLLMEngine.close)."""
    calls = tmp_path / "calls"
    cfg = GenerateConfig(compute=ComputeConfig(max_actor_restarts=2))
    with pytest.raises(Exception, match="died"):
        ray_local.data.range(2).map_batches(_engine_dies_every_call(), fn_constructor_kwargs={"calls": str(calls)},
                                            batch_size=2, **actor_pool(cfg)).materialize()
    assert calls.read_text() == "xxx"  # the first actor and its two restarts
    assert (tmp_path / "calls.closed").read_text() == "closed " * 3


def test_outside_an_actor_engine_dead_is_raised():
    with pytest.raises(EngineDead):
        _engine_dies_every_call()(os.devnull)(None)


def _actor_with_an_engine(udf: type) -> type:
    """A map_batches actor of `udf`'s class whose "engine" writes a file when closed."""
    marks_close = _engine_that_marks_close()

    class ActorWithAnEngine(udf):
        def __init__(self, marker: str, ledger) -> None:  # no model: only what __del__ reads
            self.engine, self.owns_engine = marks_close(marker, close_s=3), True  # slow, as vLLM's can be
            self.isolation = CrashIsolation(ledger)

        def __call__(self, batch):
            return batch

    return ActorWithAnEngine


@pytest.mark.parametrize("udf", [InverseInstruct, Completer], ids=["generate", "evaluate"])
def test_ray_data_retiring_an_actor_closes_its_engine_before_the_stage_ends(ray_local, tmp_path, udf):
    """Ray Data retires its actors in the background once the dataset is done: that is when the engine actors
    close their vLLM engine (their __del__; pipeline.engines.close_owned_engine says what is left to close by
    then). The stage's ledger waits for it, so that a driver ending right after cannot cut it short."""
    marker = tmp_path / "closed"
    with job_ledger() as ledger:
        ray_local.data.range(2).map_batches(
            _actor_with_an_engine(udf), fn_constructor_kwargs={"marker": str(marker), "ledger": ledger},
            batch_size=2, **actor_pool(GenerateConfig())).materialize()
    assert marker.exists() and marker.read_text() == "closed "


def _actor_with_a_child_process() -> type:
    class ActorWithAChildProcess:
        def __init__(self, marker: str) -> None:
            self.marker, self.child = marker, subprocess.Popen(["sleep", "600"])  # as vLLM's engine core

        def __call__(self, batch):
            return batch

        def __del__(self) -> None:
            with open(self.marker, "w") as f:
                f.write("running" if self.child.poll() is None else f"ended: {self.child.returncode}")
            self.child.kill()

    return ActorWithAChildProcess


def test_ray_leaves_an_engine_actors_child_processes_to_its_shutdown_hook(ray_local, tmp_path):
    """By default Ray SIGKILLs a retiring worker's child processes before it calls the actor's shutdown
    hook: vLLM's engine core would die unstopped, and Python's resource tracker with it (KeyError tracebacks
    at every CPU stage's end). The engine actors' pool turns that off (`actor_pool`), so __del__ stops them."""
    marker = tmp_path / "child"
    ray_local.data.range(2).map_batches(_actor_with_a_child_process(), fn_constructor_kwargs={"marker": str(marker)},
                                        batch_size=2, **actor_pool(GenerateConfig())).materialize()
    deadline = time.monotonic() + 60  # the pool retires its actors soon after the dataset is done
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.read_text() == "running"


@pytest.mark.parametrize("end", ["ray.kill", "crash"])
def test_an_engine_actor_that_does_not_retire_still_takes_its_child_processes_with_it(ray_local, end):
    """What the runtime_env of the test above leaves as it was: no orphaned engine core holding a GPU."""
    import psutil

    @ray_local.remote(max_restarts=0)
    class WithAChild:
        def start(self) -> int:
            self.child = subprocess.Popen(["sleep", "600"])
            return self.child.pid

        def crash(self) -> None:
            os._exit(1)

    actor = WithAChild.options(runtime_env=actor_pool(GenerateConfig())["runtime_env"]).remote()
    child = psutil.Process(ray_local.get(actor.start.remote()))
    if end == "ray.kill":
        ray_local.kill(actor)
    else:
        actor.crash.remote()

    if still_running([child], timeout_s=30):
        child.kill()
        pytest.fail(f"the child process outlived its actor ({end})")


def _reads_vllm_log_level() -> type:
    class ReadsLevel:
        def __call__(self, batch):
            return {"level": [os.environ.get("VLLM_LOGGING_LEVEL", "")] * len(batch["id"])}

    return ReadsLevel


def test_the_drivers_vllm_log_level_reaches_the_engine_actors(ray_local, monkeypatch):
    """Without --verbose the driver sets WARNING (pipeline.ray_setup.start_ray); the actors get it through
    their runtime_env, also on a cluster's other nodes, whose processes do not inherit the driver's."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # Ray's processes here started before this
    rows = ray_local.data.range(2).map_batches(_reads_vllm_log_level(), batch_size=2,
                                               **actor_pool(GenerateConfig())).take_all()
    assert [r["level"] for r in rows] == ["ERROR", "ERROR"]
    # vLLM's stats line, when asked for, is an INFO line
    stats = GenerateConfig(model=ModelConfig(log_engine_stats=True))
    assert actor_pool(stats)["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"] == "INFO"


OWNER = """
import os, subprocess, sys, time
from pipeline.engines import orphan_watch
raylet = subprocess.Popen(["sleep", "600"])  # a Ray worker's raylet, as Ray tells its workers
os.environ["RAY_RAYLET_PID"] = str(raylet.pid)
watcher = orphan_watch.watch()
# as vLLM's engine core, started after the watcher, with a message queue in shared memory
child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
segment = child.stdout.readline().strip()
time.sleep(1.5)  # the watcher notes the owner's children every second
if sys.argv[1] == "stops-it":
    orphan_watch.stop(watcher)
print(child.pid, watcher.pid, segment, raylet.pid, flush=True)
if sys.argv[1] == "its-raylet-dies":
    raylet.kill()
    raylet.wait()
time.sleep(600)
"""
CHILD = """
import time
from multiprocessing import resource_tracker, shared_memory
segment = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(segment._name, "shared_memory")  # as a killed owner leaves it: nobody unlinks it
print(segment._name, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("owner", ["dies", "its-raylet-dies", "stops-it"])
def test_an_engines_processes_die_with_their_owner_whatever_kills_it(owner, tmp_path):
    """vLLM's engine core is a child of the engine actor. When the whole local Ray instance went down under the
    actor (the command that started it killed, or Ctrl-C at a bad moment), nobody killed it: it ran on,
    orphaned, holding its KV cache (7 GiB here; a GPU's memory on a workstation). The engine's watcher kills it
    once its owner is gone, or the raylet of the Ray worker that owns it, and does nothing once the owner has
    stopped it (the engine closed normally)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", f"CHILD = {CHILD!r}\n{OWNER}", owner], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    child_pid, watcher_pid, segment, raylet_pid = proc.stdout.readline().split()
    child = psutil.Process(int(child_pid))
    try:
        watcher = [psutil.Process(int(watcher_pid))]
    except psutil.NoSuchProcess:  # stopped (and reaped) already
        watcher = []
    segment_file = Path("/dev/shm") / segment.lstrip("/")
    if owner != "its-raylet-dies":  # else the owner lives on a while, as a worker does until it notices
        proc.kill()  # SIGKILL: no atexit, no __del__, as when Ray's instance goes away
        proc.wait()

    alive = still_running([child], timeout_s=10)
    try:
        assert bool(alive) == (owner == "stops-it")
        assert not still_running(watcher, timeout_s=10)  # its work done (or stopped)
        # its shared memory is gone with it (vLLM's message queues stayed in /dev/shm)
        assert segment_file.exists() == (owner == "stops-it")
    finally:
        for process in still_running([child], timeout_s=0):
            process.kill()
        proc.kill()  # the owner (and so its fake raylet's watcher) if still there
        proc.wait()
        with contextlib.suppress(OSError):
            os.kill(int(raylet_pid), signal.SIGKILL)
        segment_file.unlink(missing_ok=True)
