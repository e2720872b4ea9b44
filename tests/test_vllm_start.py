"""Several engines on one GPU: the first start measures alone, the later ones start together with its KV size.

A real file lock, taken from threads (each opens the lock file itself, as actor processes would); `make`
stands in for `vllm.LLM` and records when it ran and with what. The byte count itself is checked against a
real vLLM engine in test_vllm_engine.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.engines import vllm_start
from pipeline.engines.vllm_start import one_start_per_gpu, start_sharing_gpu

KV_BYTES = 123 * 2**20


class Starts:
    """A stand-in for `vllm.LLM(**kwargs)` that takes 0.3 s and remembers each call."""

    def __init__(self, fail_with_measured_size: bool = False) -> None:
        self.calls: list[tuple[float, float, dict]] = []
        self.fail_with_measured_size = fail_with_measured_size
        self._lock = threading.Lock()

    def __call__(self, kwargs: dict) -> dict:
        t0 = time.perf_counter()
        time.sleep(0.3)
        if self.fail_with_measured_size and "kv_cache_memory_bytes" in kwargs:
            raise ValueError("Free memory on device ... is less than desired GPU memory utilization")
        with self._lock:
            self.calls.append((t0, time.perf_counter(), kwargs))
        return kwargs


@pytest.fixture
def measured_kv(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_start, "kv_cache_bytes", lambda llm: KV_BYTES)
    monkeypatch.setattr(vllm_start, "_blocks", lambda llm: 7)
    monkeypatch.setattr(vllm_start, "_lock_dir", lambda: tmp_path)
    return tmp_path


def start_three(make: Starts, devices: str, scope: str) -> list[dict]:
    kwargs = {"model": "m", "gpu_memory_utilization": 0.3}
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda _: start_sharing_gpu(make, kwargs, devices, scope), range(3)))


def overlap(calls: list[tuple[float, float, dict]]) -> bool:
    return max(t0 for t0, _, _ in calls) < min(t1 for _, t1, _ in calls)


def test_the_first_engine_measures_alone_and_the_others_start_together_with_its_kv_size(measured_kv):
    make = Starts()
    start_three(make, "9", f"job-{uuid.uuid4().hex}")
    first, *later = sorted(make.calls, key=lambda call: call[0])
    assert "kv_cache_memory_bytes" not in first[2]
    assert [kwargs["kv_cache_memory_bytes"] for _, _, kwargs in later] == [KV_BYTES, KV_BYTES]
    assert all(t0 >= first[1] for t0, _, _ in later)  # nobody starts while the first one measures
    assert overlap(later)


def test_other_settings_or_another_job_measure_for_themselves(measured_kv):
    make = Starts()
    scope = f"job-{uuid.uuid4().hex}"
    start_sharing_gpu(make, {"model": "m", "max_num_seqs": 256}, "9", scope)
    start_sharing_gpu(make, {"model": "m", "max_num_seqs": 512}, "9", scope)
    start_sharing_gpu(make, {"model": "m", "max_num_seqs": 256}, "9", f"job-{uuid.uuid4().hex}")
    assert not any("kv_cache_memory_bytes" in kwargs for _, _, kwargs in make.calls)


def test_a_failed_start_with_the_measured_size_is_retried_alone_with_vllms_own_measure(measured_kv):
    make = Starts(fail_with_measured_size=True)
    started = start_three(make, "9", f"job-{uuid.uuid4().hex}")
    assert len(make.calls) == 3 and not any("kv_cache_memory_bytes" in kwargs for kwargs in started)
    calls = sorted(make.calls, key=lambda call: call[0])
    assert all(later[0] >= earlier[1] for earlier, later in zip(calls, calls[1:]))  # one at a time again


def test_outside_ray_every_engine_measures_one_at_a_time(measured_kv):
    make = Starts()
    start_three(make, "9", "")
    calls = sorted(make.calls, key=lambda call: call[0])
    assert not any("kv_cache_memory_bytes" in kwargs for _, _, kwargs in calls)
    assert all(later[0] >= earlier[1] for earlier, later in zip(calls, calls[1:]))


def test_no_kv_size_to_share_means_one_at_a_time(monkeypatch):
    """Models whose KV cache is not plain K and V per layer (MLA, hybrid) give no byte count."""
    monkeypatch.setattr(vllm_start, "kv_cache_bytes", lambda llm: None)
    monkeypatch.setattr(vllm_start, "_blocks", lambda llm: 7)
    make = Starts()
    start_three(make, "9", f"job-{uuid.uuid4().hex}")
    calls = sorted(make.calls, key=lambda call: call[0])
    assert not any("kv_cache_memory_bytes" in kwargs for _, _, kwargs in calls)
    assert all(later[0] >= earlier[1] for earlier, later in zip(calls, calls[1:]))


def test_starts_on_one_gpu_take_turns_and_on_different_gpus_run_at_once():
    def start(devices: str) -> tuple[float, float, dict]:
        with one_start_per_gpu(devices):
            t0 = time.perf_counter()
            time.sleep(0.3)
            return t0, time.perf_counter(), {}

    with ThreadPoolExecutor(3) as pool:
        same = sorted(pool.map(start, ["7", "7", "7"]), key=lambda call: call[0])
        other = list(pool.map(start, ["7", "6", "5"]))
    assert all(later[0] >= earlier[1] for earlier, later in zip(same, same[1:])), same
    assert overlap(other), other


def test_a_kv_size_that_cannot_be_read_costs_the_others_their_shortcut_not_the_first_its_start(monkeypatch):
    def unreadable(llm):
        raise AttributeError("'VllmConfig' object has no attribute 'cache_config'")

    monkeypatch.setattr(vllm_start, "kv_cache_bytes", unreadable)
    make = Starts()
    started = start_three(make, "9", f"job-{uuid.uuid4().hex}")
    assert len(started) == 3 and not any("kv_cache_memory_bytes" in kwargs for _, _, kwargs in make.calls)


def test_sizes_recorded_by_jobs_over_a_day_ago_are_deleted(measured_kv):
    """One small file per job and GPU set: a long-lived node would collect them for ever."""
    import os

    stale, recent = (measured_kv / f"inverse-instruct-vllm-kv-gpu-0-{name}.json" for name in ("stale", "recent"))
    for path, age_h in ((stale, 25), (recent, 23)):
        path.write_text("{}")
        os.utime(path, (time.time() - age_h * 3600,) * 2)
    start_sharing_gpu(Starts(), {"model": "m"}, "0", f"job-{uuid.uuid4().hex}")
    assert not stale.exists() and recent.exists()
    assert len(list(measured_kv.glob("inverse-instruct-vllm-kv-gpu-0-*.json"))) == 2  # this job's and the recent one
