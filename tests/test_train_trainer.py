"""`inverse-instruct train` end to end through Ray Train on CPU (2 DDP workers over gloo, tiny model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.process_tools import kill_session, session_processes, still_running

REPO = Path(__file__).resolve().parent.parent
CPU_CONFIG = REPO / "configs" / "train_cpu.yaml"


@pytest.fixture(scope="module")
def generated(tmp_path_factory, corpus) -> Path:
    """A `selected/` folder as generate writes it, plus one bad row (no response)."""
    folder = tmp_path_factory.mktemp("selected")
    rows = [{"id": f"g{i}", "instruction": r["instruction"], "response": r["output"]} for i, r in enumerate(corpus[:40])]
    rows.append({"id": "bad", "instruction": "Write a python function.", "response": None})
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
    return folder


def _cli(tiny_model: str, generated: Path, output: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(CPU_CONFIG), "--model", tiny_model,
            "--generated", str(generated), "--output", str(output), "--num-workers", "2",
            "--set", "lora.enabled=false", "--set", "data.max_length=128"]
    for item in overrides:
        args += ["--set", item]
    return args


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


def _checkpoint_steps(output: Path) -> set[int]:
    """Steps whose checkpoint Ray Train has registered (its manager's snapshot), which a rerun resumes from.
    A checkpoint's folder is written by the workers a moment before the controller registers it: a driver
    killed in between resumes from the checkpoint before (CI saw one killed run start over from step 0)."""
    snapshot = output / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write: look again
        return set()
    return {int(r["checkpoint_dir_name"].split("_")[1]) for r in results}


def _logged_steps(log: Path) -> dict[int, str]:
    """step -> data digest, from the `[train] step N/T ... data DIGEST` lines a run printed."""
    found = re.findall(r"\[train\] step (\d+)/\d+ .* data (\w+)", log.read_text(errors="replace"))
    return {int(step): digest for step, digest in found}


@pytest.mark.slow
def test_killed_driver_resumes_from_its_checkpoint(tiny_model, generated, tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    # ~60 steps of 2 sequences; a checkpoint every 10 steps.
    args = _cli(tiny_model, generated, out, "data.limit=60", "optim.global_batch_size=4",
                "checkpoint.every_steps=10", "checkpoint.num_to_keep=3")
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, env=_env(), start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        # Kill a step or two after a checkpoint, so that the killed run trained steps the resumed one redoes.
        while time.time() < deadline and proc.poll() is None:
            saved = _checkpoint_steps(out)
            if saved and max(_logged_steps(log), default=0) > max(saved):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished (or failed) before it could be interrupted"
        kill_session(proc)  # the driver, the local Ray instance it started, Ray's workers
    at_kill = _checkpoint_steps(out)
    assert at_kill and not (out / "model").exists()

    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    resumed = m["resumed_from_step"]
    assert len(resumed) == 1 and resumed[0] in at_kill and resumed[0] > 0  # from a checkpoint, not from scratch
    assert m["steps"] == sum(m["planned_steps"]) == sum(m["steps_per_phase"])
    state = json.loads(sorted((out / "checkpoints").glob("step_*_final_*/state.json"))[-1].read_text())
    assert [h["step"] for h in state["history"]] == list(range(1, m["steps"] + 1))  # each step once
    assert f"start at step {resumed[0]} " in done.stdout + done.stderr
    assert m["data"]["generated"]["by_status"]["read: missing field: response"] == 1  # its response is null
    # The steps trained twice (after the checkpoint, before the kill) saw the same rows both times:
    # the resumed run skipped exactly what the checkpoint had consumed.
    killed = _logged_steps(log)
    redone = {step: digest for step, digest in killed.items() if step > resumed[0]}
    assert redone, f"killed at step {max(killed)}, resumed from {resumed[0]}: no step was trained twice"
    assert redone == {h["step"]: h["data"] for h in state["history"] if h["step"] in redone}


@pytest.mark.slow
def test_ctrl_c_stops_training_with_its_exit_code_and_the_same_command_resumes(tiny_model, generated, tmp_path):
    """Ray Train's Ctrl-C handler aborted the run and the command then exited 1 without a word."""
    out, log = tmp_path / "run", tmp_path / "interrupted.log"
    args = _cli(tiny_model, generated, out, "data.limit=60", "optim.global_batch_size=4", "checkpoint.every_steps=5")
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, env=_env(), start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
                                # as in a terminal (a shell's background job, CI's, inherits an ignored SIGINT)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 400
            while time.time() < deadline and proc.poll() is None and not _checkpoint_steps(out):
                time.sleep(0.05)
            assert proc.poll() is None, "the run finished (or failed) before it could be interrupted"
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the whole foreground group
            assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
            assert not still_running(session_processes(proc.pid), timeout_s=30)
        finally:
            kill_session(proc)
    text = log.read_text()
    # The command's own lines (not the ones Ray relays from its actors, `(RayTrainWorker pid=...) ...`)
    own = "\n".join(line for line in text.splitlines() if not re.match(r"(\x1b\[\d+m)?\((\w+ )?pid=\w+", line))
    assert "interrupted" in own.splitlines(), text[-3000:]
    assert "Traceback" not in own, own[max(0, own.find("Traceback") - 1500):][:4000]
    assert re.search(r"\[train\] step \d+/\d+ .* eta (\d+h\d\dm|\d+m\d\ds|\d+s) data \w+\n", text)  # time left
    assert not (out / "model").exists()

    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["resumed_from_step"]) == 1 and m["resumed_from_step"][0] > 0  # from a checkpoint
    assert m["steps"] == sum(m["planned_steps"])
    said = done.stdout + done.stderr  # Ray Train's and Ray Data's INFO lines only with -v (43 of 68 lines before)
    for noise in ("Reporting training result", "Checkpoint successfully created", "Requesting resources",
                  "Starting execution of Dataset"):
        assert noise not in said, said[said.find(noise) - 500:][:1500]
    assert re.search(r"; loss \d+\.\d{4} -> \d+\.\d{4}; tokens/s [\d,]+ \(\d+% of the steps' time waiting for data\); "
                     r"MFU n/a\n", said), said[-1000:]


@pytest.mark.slow
def test_padded_mixed_run_writes_a_loadable_model_and_a_report(ray_local, tiny_model, generated, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import TrainConfig, load_config
    from pipeline.models import cache_dir
    from pipeline.train.data import KEPT
    from pipeline.train.trainer import train

    # The base model through a URI, as from s3://: the driver fetches its tokenizer, each worker all of it.
    cfg = load_config(CPU_CONFIG, {"model.path": f"file://{tiny_model}", "data.generated": str(generated),
                                   "output": str(tmp_path), "lora.enabled": False, "data.packing": False,
                                   "data.schedule": "mixed",
                                   "data.limit": 20, "data.max_length": 128}, schema=TrainConfig)
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        m = train(cfg)
        # Ray Train's own Ctrl-C handler, left installed after fit, took a later Ctrl-C (in a loop's evaluations).
        assert signal.getsignal(signal.SIGINT) is ctrl_c
        checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
        assert train(cfg) == m  # the same command again: the finished run is not redone
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints
    finally:  # the copies in this node's model cache (the workers' default cache, as in a user's run)
        for copy in (cache_dir() / "models" / "remote").glob(f"{Path(tiny_model).name}-*"):
            shutil.rmtree(copy)
    assert m["model"] == f"file://{tiny_model}" and m["phases"] == ["generated + original", "original"]
    assert m["steps_per_phase"] == m["planned_steps"] and m["steps"] > 0
    gen = m["data"]["generated"]
    assert gen["rows"] == 41 and gen["dropped"] == sum(n for s, n in gen["by_status"].items() if s not in KEPT) > 0
    t = m["throughput"]
    # Throughput over the steps' time, waiting for data included (the first step of each pass waits for its
    # shuffle): not over the forward/backward time alone, which showed a data-bound run as a fast one.
    assert 0 < t["data_wait_seconds"] < t["train_seconds"]
    assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["train_seconds"], rel=0.01)
    assert t["mfu"] is None  # CPU, no configured peak
    report = (tmp_path / "report.md").read_text()
    assert f"| of which waiting for data | {t['data_wait_seconds']} s (" in report
    assert "tokens/s" in report and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert f"- data: generated `{generated}`, original `embedded`" in report
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    trained = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, base)  # the saved weights are the trained ones
    assert tok.eos_token == AutoTokenizer.from_pretrained(tiny_model).eos_token


@pytest.mark.slow
def test_fsdp2_trains_the_same_steps_as_ddp(ray_local, tiny_model, generated, tmp_path):
    """FSDP2 (parameters sharded per decoder layer, gradients reduce-scattered) and DDP (replicated,
    all-reduced) compute the same optimizer step: in float32 on the same shards they must give the same
    losses and the same final weights. Also runs FSDP2's collective checkpoint and final-model saves."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import TrainConfig, load_config
    from pipeline.train.trainer import train

    histories, weights = {}, {}
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        cfg = load_config(CPU_CONFIG, {"model.path": tiny_model, "data.generated": str(generated), "output": str(out),
                                       "lora.enabled": False, "data.limit": 16, "data.max_length": 128,
                                       "optim.global_batch_size": 4, "optim.max_steps": 4,
                                       "checkpoint.every_steps": 2, "checkpoint.num_to_keep": 4,
                                       "compute.strategy": strategy}, schema=TrainConfig)
        m = train(cfg)
        assert m["steps"] == 4
        state = json.loads(sorted((out / "checkpoints").glob("step_*_final_*/state.json"))[-1].read_text())
        histories[strategy] = state["history"]
        assert (out / "checkpoints" / "step_000002" / "model.pt").exists()  # the mid-run checkpoint
        # Step 4 is a multiple of every_steps and the last: written once, as the final checkpoint.
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000002", "step_000004_final_1"]
        weights[strategy] = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    ddp, fsdp = histories["ddp"], histories["fsdp2"]
    assert [h["data"] for h in fsdp] == [h["data"] for h in ddp]  # the same rows, step by step
    np.testing.assert_allclose([h["loss"] for h in fsdp], [h["loss"] for h in ddp], rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in fsdp], [h["grad_norm"] for h in ddp], rtol=1e-4)
    assert weights["fsdp2"].keys() == weights["ddp"].keys()
    for name, value in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp2"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    assert not torch.equal(weights["fsdp2"]["model.layers.0.mlp.up_proj.weight"],
                           base["model.layers.0.mlp.up_proj.weight"])


def test_a_max_length_past_the_models_positions_is_capped_at_them(ray_local, tiny_model, generated, tmp_path):
    """A base model of 64 learned positions (GPT-2's kind) with data.max_length=128: training sequences are
    cut at 64 (a warning says so; the manifest and report say 64). Before, every step past position 63 was
    an IndexError in the embedding, and the run failed after its retries."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from pipeline.config import TrainConfig, load_config
    from pipeline.train.trainer import train

    base = tmp_path / "gpt2-64"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=64,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(base)
    cfg = load_config(CPU_CONFIG, {"model.path": str(base), "data.generated": str(generated),
                                   "output": str(tmp_path / "out"), "lora.enabled": False, "data.limit": 12,
                                   "data.max_length": 128, "optim.max_steps": 2}, schema=TrainConfig)
    m = train(cfg)
    assert m["steps"] == 2 and m["max_length"] == 64
    assert m["data"]["original"]["by_status"].get("truncated", 0) > 0  # the corpus's rows are longer than 64
    assert "max length 64" in (tmp_path / "out" / "report.md").read_text()


def test_a_run_with_no_step_to_take_is_refused(ray_local, tiny_model, generated, tmp_path):
    """Every row dropped (here: data.max_length below the prompts' length) leaves no training step. That run
    ended "done" with the base model saved as the tuned one (0 steps, loss None, exit 0); now it is refused,
    naming the sources, why their rows were dropped, and the keys that decide it."""
    from pipeline.config import ConfigError, TrainConfig, load_config
    from pipeline.train.trainer import train

    cfg = load_config(CPU_CONFIG, {"model.path": tiny_model, "data.generated": str(generated),
                                   "output": str(tmp_path / "out"), "data.limit": 8, "data.max_length": 16},
                      schema=TrainConfig)
    with pytest.raises(ConfigError, match=r"nothing to train: generated: 41 rows -> 0 sequences \(dropped: "
                                          r"prompt too long \d+, read: missing field: response 1\); original: 8 rows "
                                          r"-> 0 sequences \(dropped: prompt too long 8\); a pass needs at least 2 "
                                          r"sequence\(s\), one per worker \(compute.num_workers=2\); data.max_length=16"):
        train(cfg)
    assert not (tmp_path / "out" / "model").exists()


def test_a_mistyped_data_path_is_refused_before_any_data_is_read(tiny_model, generated, tmp_path):
    """A missing original corpus was found only when its pass was read, after the generated pairs had been
    read and tokenized (94 s for 78,660 pairs on 2 cores), and the output folder was left behind."""
    from pipeline.config import ConfigError, TrainConfig, load_config
    from pipeline.train.trainer import train

    out = tmp_path / "out"
    for overrides, error in (({"data.original.path": str(tmp_path / "orig.jsonl")}, "data.original.path: .*/orig.jsonl"),
                             ({"data.generated": str(tmp_path / "gen")}, "data.generated: .*/gen")):
        cfg = load_config(CPU_CONFIG, {"model.path": tiny_model, "data.generated": str(generated), "output": str(out),
                                       **overrides}, schema=TrainConfig)
        with pytest.raises(ConfigError, match=f"{error} does not exist"):
            train(cfg)
        assert not out.exists()


def test_an_original_corpus_of_other_field_names_is_refused_naming_the_keys():
    """An OSS-Instruct corpus (`problem` / `solution`) read with the default field names lost every row as
    `missing field`, with a warning, and the run went on training on the generated pairs alone."""
    from pipeline.config import ConfigError
    from pipeline.train.trainer import check_plan

    counts = {"generated": {"rows": 25, "sequences": 25, "by_status": {"ok": 25}},
              "original": {"rows": 16, "sequences": 0, "by_status": {"read: missing field: instruction": 16}}}
    with pytest.raises(ConfigError, match=r"train: original: none of its 16 rows has the fields it is read by "
                                          r"\(read: missing field: instruction 16\); "
                                          r"see data.original.instruction_field"):
        check_plan([("generated",), ("original",)], [3, 0], counts, world=2, max_length=256)
    counts["original"]["by_status"] = {"read: missing field: instruction": 15, "ok": 1}  # one row: a bad row
    check_plan([("generated",), ("original",)], [3, 0], counts, world=2, max_length=256)


def test_workers_this_machine_cannot_hold_are_refused_not_waited_for(tiny_model, generated, tmp_path):
    """Training workers that the job's own Ray instance cannot place beside one CPU for Ray Data's tasks were
    waited for forever (until 2026-12-06): `--use-gpu` without a GPU (Ray Train retried its 60 s worker-group
    timeout), or on 2 cores four 0.5-CPU workers (all started, then step 0 never came: no CPU to feed them)."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine holds two GPU workers")
    t0 = time.perf_counter()
    done = subprocess.run([*_cli(tiny_model, generated, tmp_path / "run"), "--use-gpu"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"error: compute.num_workers / use_gpu / cpus_per_worker / resources_per_worker: training "
                     r"workers \(2 x \{'CPU': 0.5, 'GPU': 1\}\) and one CPU for Ray Data's tasks do not fit this "
                     r"machine's Ray instance \(\{'CPU': \d+.0, 'GPU': [01]\} in all\): Ray would wait for room "
                     r"forever", done.stderr)
    assert time.perf_counter() - t0 < 120 and "train: generated:" not in done.stderr  # before any data work
    assert re.search(r"INFO pipeline.ray_setup: ray: started a local instance \(\d+ CPUs, [01] GPUs\)", done.stderr)
