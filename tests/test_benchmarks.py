"""The GPU benchmarks' shared parts, and every benchmark script at least starts (CI has no GPU to run them;
a session with the H100 has no time to debug them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import SHAPES, build_model, forced_length, load_snippets, spearman

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_and_explains_itself(script):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.parametrize("name, billions", [("qwen2-1.5b", 1.39), ("llama-6.7b", 6.88)])
def test_random_weight_shapes_have_the_size_they_claim(name, billions, tmp_path):
    # The embedded model's 49,152-token vocabulary (its tokenizer is reused) makes them a little smaller than
    # Qwen2.5-1.5B (151,936) and a little larger than deepseek-coder-6.7b (32,256).
    model = build_model(name, tmp_path)
    assert model.load_format == "dummy" and not model.real
    assert model.params / 1e9 == pytest.approx(billions, abs=0.01)
    assert SHAPES[name]["model_type"] in (tmp_path / name / "config.json").read_text()
    assert (tmp_path / name / "tokenizer.json").exists()


def test_forced_lengths_follow_the_snippet_not_the_call():
    lengths = [10, 20, 30, 40, 50]
    ids = [f"bench:{i}" for i in range(200)]
    first = [forced_length(i, lengths) for i in ids]
    assert first == [forced_length(i, lengths) for i in ids]  # every variant forces the same length
    assert set(first) == set(lengths)  # ... drawn from the whole measured distribution


def test_forced_lengths_are_the_committed_measurement_of_the_embedded_model():
    """Every step forces the same lengths, so any part of a GPU session may run first."""
    from benchmarks.common import read_lengths

    lengths = read_lengths()
    assert "seed_replay" in lengths["source"] and len(lengths["summary"]) >= 500
    assert 50 <= sorted(lengths["summary"])[len(lengths["summary"]) // 2] <= 300
    assert len(lengths["judge"]) >= 500 and 1 <= sorted(lengths["judge"])[len(lengths["judge"]) // 2] <= 5


def test_spearman_gives_tied_scores_their_average_rank():
    assert spearman([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert spearman([0.5, 0.5, 0.9], [0.5, 0.5, 0.9]) == pytest.approx(1.0)
    # ties averaged: ranks (0.5, 0.5, 2) vs (0, 1, 2) -> rho = 0.866, not 1.0 as with arbitrary tie order
    assert spearman([0.5, 0.5, 0.9], [0.1, 0.2, 0.3]) == pytest.approx(0.8660254, rel=1e-6)


def test_benchmark_snippets_are_distinct_real_code_with_stable_ids():
    snippets = load_snippets(20)
    assert len({s["code"] for s in snippets}) == 20
    assert all(s["code"].strip() and s["id"] == f"bench:{s['source_index']}" for s in snippets)
    assert [s["id"] for s in load_snippets(5)] == [s["id"] for s in snippets[:5]]


def test_every_step_of_the_gpu_plan_parses_with_its_script():
    """A typo in a step's arguments would cost a step of a scarce GPU session: catch it here."""
    import importlib

    from benchmarks.run_gpu import MODEL_NAMES, PLAN

    for part, module, args, _ in PLAN:
        parsed = importlib.import_module(f"benchmarks.{module}").parser().parse_args(args)
        assert getattr(parsed, "model", MODEL_NAMES[part]) == MODEL_NAMES[part], (part, args)


ENGINE_CORE = 'process 7:"python -m benchmarks.factory";process 9:"VLLM::EngineCore; odd ( cmdline"'
LOOP = "EngineCoreProc.run_busy_loop (vllm/v1/engine/core.py:880)"


def test_stacks_summary_splits_each_loop_into_a_tree_of_wall_time_shares():
    from benchmarks.stacks import summarize

    lines = [
        f"{ENGINE_CORE};<module> (<string>:1);{LOOP};EngineCore.step (vllm/v1/engine/core.py:400);"
        "Scheduler.schedule (vllm/v1/core/sched/scheduler.py:312) 30\n",
        f"{ENGINE_CORE};<module> (<string>:1);{LOOP};EngineCore.step (vllm/v1/engine/core.py:402);"
        "Scheduler.schedule (vllm/v1/core/sched/scheduler.py:340) 20\n",  # another line, the same function
        f"{ENGINE_CORE};<module> (<string>:1);{LOOP};EngineCore.step (vllm/v1/engine/core.py:410);"
        "wait_for_gpu (vllm/v1/worker/gpu_model_runner.py:90) 49\n",
        f'process 7:"python";process 11:"VLLM::EngineCore";{LOOP} 1\n',  # a second engine, in its loop itself
        f"{ENGINE_CORE};<module> (<string>:1);EngineCore.__init__ (vllm/v1/engine/core.py:80) 500\n",  # start-up
        # a command line with a newline in it spreads one record over two lines
        'process 7:"python -c \n import benchmarks";run (pipeline/engines/vllm_loop.py:120);'
        "EngineLoop._serve (pipeline/engines/vllm_loop.py:130);LLMEngine.step (vllm/v1/engine/llm_engine.py:250);"
        "SyncMPClient.get_output (vllm/v1/engine/core_client.py:700);Queue.get (queue.py:180) 4\n",
    ]
    summary = summarize("".join(lines).splitlines(keepends=True), min_share=0.05)  # lines as a file has them
    core = summary["engine core"]
    assert (core["samples"], core["processes"]) == (100, 2)  # the engine's start-up is not in its loop
    [(step, share, children)] = core["tree"]
    assert (step, share) == ("EngineCore.step (vllm/v1/engine/core.py)", 0.99)
    assert [c[:2] for c in children] == [["Scheduler.schedule (vllm/v1/core/sched/scheduler.py)", 0.5],
                                         ["wait_for_gpu (vllm/v1/worker/gpu_model_runner.py)", 0.49]]
    assert core["self"][-1] == ["(the loop itself)", 0.01]
    feeding = summary["feeding loop"]  # one call chain: folded into one entry
    assert (feeding["samples"], feeding["processes"]) == (4, 1)
    assert feeding["tree"] == [["LLMEngine.step › SyncMPClient.get_output › Queue.get (queue.py)", 1.0, []]]
    assert "model worker" not in summary  # vLLM ran the model in the engine core's process


def test_run_gpu_samples_a_step_and_every_process_it_starts(tmp_path):
    # The real py-spy (a dev dependency) on a child that runs a loop named like vLLM's in a spawned process:
    # what run_gpu.py does to every step on the GPU machine, where nobody can debug it.
    from benchmarks.run_gpu import exit_status, py_spy_works, sampled
    from benchmarks.stacks import read_lines, summarize

    script = tmp_path / "engine.py"
    script.write_text(
        "import multiprocessing as mp, sys, time\n"
        "def schedule(until):\n"
        "    while time.time() < until: sum(range(100))\n"
        "class EngineCoreProc:\n"
        # busy 60% of each short cycle, not one long busy phase: py-spy may attach to a new process late
        # (the likely cause of 0.435 in one CI run with 1.5 s busy, then 1 s asleep), and a late start must
        # not change the shares
        "    def run_busy_loop(self):\n"
        "        for _ in range(12):\n"
        "            schedule(time.time() + 0.15)\n"
        "            time.sleep(0.1)\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('spawn')\n"
        "    p = mp.Process(target=EngineCoreProc().run_busy_loop); p.start(); p.join()\n"
        "    sys.exit(3)\n")
    assert py_spy_works(tmp_path)
    stacks = tmp_path / "step.stacks"
    done = subprocess.run(sampled([sys.executable, str(script)], stacks), capture_output=True, text=True,
                          timeout=120)
    assert exit_status(done.stdout, done.returncode) == 3, done.stdout + done.stderr
    core = summarize(read_lines(stacks))["engine core"]
    shares = {frame.split(" ")[0]: share for frame, share, _ in core["tree"]}
    assert core["processes"] == 1 and core["samples"] > 50
    assert shares["schedule"] == pytest.approx(0.6, abs=0.15)  # idle frames count: sleeping is in the loop itself


def test_a_device_call_brings_back_its_results_logs_and_the_caches_that_fit(tmp_path):
    """benchmarks/gpu_pack.sh within the device tool's limits (at most 8 files of 16 MiB): the compile caches
    that fit in the files left, in 15 MiB parts, the most useful first; restored once per machine."""
    import os
    import tarfile

    bench, out, root = tmp_path / "bench", tmp_path / "out", tmp_path / "root"
    (bench / "logs").mkdir(parents=True)
    (bench / "results.jsonl").write_text('{"variant": "factory"}\n')
    (bench / "logs" / "00-factory.log").write_text("engine started\n")
    (bench / "logs" / "00-factory.where.txt").write_text("engine core 80%\n")
    (bench / ".call-1").touch()
    sizes = {"home/.cache/vllm": 20, "home/.triton/cache": 2, "tmp/inductor": 12}  # MiB, most useful first
    for d, mib in sizes.items():
        (root / d).mkdir(parents=True)
        (root / d / "kernel.bin").write_bytes(os.urandom(mib << 20))  # random: gzip cannot shrink it
    script = REPO / "benchmarks" / "gpu_pack.sh"
    env = {**os.environ, "BENCH": str(bench), "CALL_START": str(bench / ".call-1"), "CACHE_ROOT": str(root),
           "CACHE_DIRS": "home/.cache/vllm home/.triton/cache home/.cache/flashinfer tmp/inductor"}

    def pack(out: Path, files_already_there: int = 0) -> tuple[set[str], str]:
        out.mkdir()
        for i in range(files_already_there):
            (out / f"step-{i}.log").write_text("a step's own file")
        subprocess.run(["bash", "-c", f"source {script} && pack_out"], env={**env, "OUT": str(out)}, check=True,
                       timeout=120)
        assert len(list(out.iterdir())) <= 8 and all(p.stat().st_size < 16 << 20 for p in out.iterdir())
        return {p.name for p in out.iterdir()}, (out / "device.txt").read_text()

    names, device = pack(out)
    assert names == {"results.jsonl", "logs.tar.gz", "device.txt", "caches.tar.gz.part0", "caches.tar.gz.part1"}
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert {"./logs/00-factory.log", "./logs/00-factory.where.txt"} <= set(logs.getnames())
    assert "caches packed: home/.cache/vllm home/.triton/cache\n" in device  # 34 MiB > 2 parts: inductor dropped

    fresh = tmp_path / "fresh"
    (fresh / "tmp").mkdir(parents=True)
    restore = f"source {script} && restore_caches {out}"
    subprocess.run(["bash", "-c", restore], env={**env, "CACHE_ROOT": str(fresh)}, check=True, timeout=60)
    for d in ("home/.cache/vllm", "home/.triton/cache"):
        assert (fresh / d / "kernel.bin").read_bytes() == (root / d / "kernel.bin").read_bytes()
    assert not (fresh / "tmp/inductor").exists()
    (fresh / "home/.cache/vllm/kernel.bin").write_bytes(b"compiled here since")
    subprocess.run(["bash", "-c", restore], env={**env, "CACHE_ROOT": str(fresh)}, check=True, timeout=60)
    assert (fresh / "home/.cache/vllm/kernel.bin").read_bytes() == b"compiled here since"  # once per machine

    # a call whose step left 4 files of its own has room for one part: the 20 MiB folder is left out, the
    # smaller ones after it fit
    names, device = pack(tmp_path / "out-full", files_already_there=4)
    assert "caches.tar.gz.part0" in names and "caches.tar.gz.part1" not in names
    assert "caches packed: home/.triton/cache tmp/inductor\n" in device
    names, device = pack(tmp_path / "out-fuller", files_already_there=5)
    assert not any(n.startswith("caches") for n in names) and "caches packed: none (files left: 0)" in device
