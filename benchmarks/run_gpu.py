"""All GPU benchmarks of issue 4 in one command per part, within a time budget, results kept as they come.

    python -m benchmarks.run_gpu --part embedded|1.5b|6.7b|all [--budget-s 560] [--out DIR] [--scale 1.0]

Each step is its own process (a clean GPU between variants; vLLM engines do not always give all memory
back in-process), with a timeout from what is left of the budget, so a slow step costs only itself.
Every RESULT line is appended to OUT/results.jsonl at once; at the end the table of everything in that
file is printed (so the last part prints all parts). The random-weight models are forced to the embedded
model's real output lengths, always the committed measurement (benchmarks/results/lengths-embedded.json,
named in each row as `forced_lengths`), so any part may run first. Steps labelled *_sampled
(all steps with --stacks all) run under py-spy where it can read processes: OUT/logs/ gets the step's sampled
stacks and where its engine's time went (benchmarks/stacks.py). Only those: py-spy takes CPU (half a core
for an idle Ray cluster here; on 2 cores a whole `generate` ran 6.6x slower under it), and the CPU is what
binds these runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import device_name, table, versions
from benchmarks.stacks import read_lines, render, summarize

# (part, module, args, seconds it needs on an H100, measured or estimated: skipped when less is left).
# The first engine start of a model shape on a machine compiles (torch.compile, FlashInfer autotune: ~200 s
# for the embedded model); later starts take ~55-85 s each. Engines sharing a GPU: the first starts alone,
# the others together after it (pipeline/engines/vllm_start.py; one after another until 2026-11-24).
# 2026-11-24 (second session), embedded model: factory / seed_replay = 1.01 with one engine, 1.42 with two
# engines per GPU, 2.17 with four (benchmarks/RESULTS.md). Both paths are bound by the engine core's Python,
# not the GPU, at 135M and 1.4B alike; each engine is its own process. So the other shapes come first, with
# their multi-engine variants, then the engines/ray_data_llm comparisons, then the embedded pair again (the
# ratio from one machine hold), then the variants that say where one engine's time goes.
FACTORY_S = 160  # one engine, warm caches: 140-152 s measured (100 s was too little: two runs killed)
PLAN = [
    ("1.5b", "seed_replay", ["--model", "qwen2-1.5b", "--snippets", "256"], 420),
    ("1.5b", "factory", ["--model", "qwen2-1.5b", "--snippets", "256", "--engines", "4", "--max-num-seqs", "512",
                         "--label", "factory_4_engines"], 360),
    ("6.7b", "seed_replay", ["--model", "llama-6.7b", "--snippets", "128"], 420),
    # four 6.7B engines would leave ~3 GiB of KV cache each (18 GiB shares, 13.4 GiB of weights): two
    ("6.7b", "factory", ["--model", "llama-6.7b", "--snippets", "128", "--engines", "2", "--max-num-seqs", "512",
                         "--label", "factory_2_engines"], 300),
    ("embedded", "engines", ["--snippets", "16"], 150),
    ("1.5b", "ray_data_llm", ["--model", "qwen2-1.5b", "--snippets", "256"], 300),
    ("1.5b", "factory", ["--model", "qwen2-1.5b", "--snippets", "256"], FACTORY_S),
    ("6.7b", "factory", ["--model", "llama-6.7b", "--snippets", "128"], 200),
    ("1.5b", "factory", ["--model", "qwen2-1.5b", "--snippets", "256", "--engines", "2", "--max-num-seqs", "512",
                         "--label", "factory_2_engines"], 220),
    ("embedded", "seed_replay", ["--model", "embedded", "--snippets", "256"], 420),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--engines", "4", "--max-num-seqs", "512",
                             "--label", "factory_4_engines"], 300),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256"], FACTORY_S),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--engines", "2", "--max-num-seqs", "512",
                             "--label", "factory_2_engines"], 210),
    # do eight pay more than four (until the GPU itself is busy, or the machine's 16 cores are)?
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--engines", "8", "--max-num-seqs", "512",
                             "--label", "factory_8_engines"], 540),
    # `factory` again under py-spy: where one engine core's time goes (logs/*.where.txt), and, against the plain
    # `factory` above, what the sampling itself costs
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--label", "factory_sampled"], FACTORY_S),
    # vLLM's H100 defaults run up to 1,024 requests but capture CUDA graphs for steps of up to 512 tokens only
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--max-num-seqs", "512", "--label",
                             "factory_max_seqs_512"], FACTORY_S),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--max-cudagraph-capture-size", "1024",
                             "--label", "factory_graphs_1024"], FACTORY_S),
    # seed_replay's shape (all snippets, then all judging) inside our actor: n=K requests, one engine; with
    # vLLM's stats line in its log (running/waiting requests, prefix-cache hits), the others without (its cost)
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--batch-size", "256",
                             "--concurrent-batches", "1", "--no-overlap", "--log-stats", "--label",
                             "factory_one_batch_no_overlap"], FACTORY_S),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--no-overlap", "--label",
                             "factory_no_overlap"], FACTORY_S),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--concurrent-batches", "1", "--label",
                             "factory_one_batch_at_a_time"], FACTORY_S),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--code-first", "--label",
                             "factory_code_first"], FACTORY_S),
    ("1.5b", "factory", ["--model", "qwen2-1.5b", "--snippets", "256", "--max-num-seqs", "512", "--label",
                         "factory_max_seqs_512"], FACTORY_S),
    ("embedded", "factory", ["--model", "embedded", "--snippets", "256", "--ngram-spec", "4", "--label",
                             "factory_ngram_spec"], FACTORY_S),
    ("6.7b", "factory", ["--model", "llama-6.7b", "--snippets", "128", "--code-first", "--label",
                         "factory_code_first"], 200),
]

COLUMNS = ["model", "variant", "engines", "snippets", "engine_start_s", "steady_s", "snippets_per_s", "speedup",
           "output_tokens_per_s", "judge_paper_order_mfu", "judge_code_first_mfu", "judge_order_spearman",
           "peak_gpu_memory_gib", "loop_cpu_share"]


def scaled(args: list[str], scale: float) -> list[str]:
    out = list(args)
    if "--snippets" in out:
        i = out.index("--snippets") + 1
        out[i] = str(max(2, int(int(out[i]) * scale)))
    return out


MODEL_NAMES = {"embedded": "embedded", "1.5b": "qwen2-1.5b", "6.7b": "llama-6.7b"}
STEP_MARK = "II_BENCH_STEP"  # in the environment of every process a step starts (inherited by its children)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gpu_free() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return f"GPU memory used/total: {out}"
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


STACK_RATE = 50  # py-spy samples per second and process


def sampled(cmd: list[str], stacks: Path) -> list[str]:
    """`cmd` under py-spy (every process it starts, idle frames included, never paused). py-spy exits 0 whatever
    its child does, so a shell prints the child's exit status last (read back by `exit_status`)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # a venv's, not on PATH
    return [py_spy, "record", "--subprocesses", "--idle", "--nonblocking", "--rate", str(STACK_RATE),
            "--format", "raw", "-o", str(stacks), "--", "sh", "-c", '"$@"; echo "STEP_EXIT $?"', "sh", *cmd]


def exit_status(stdout: str, rc: int) -> int:
    lines = [line for line in stdout.splitlines() if line.startswith("STEP_EXIT ")]
    return int(lines[-1].split()[1]) if lines and rc == 0 else rc


def py_spy_works(workdir: Path) -> bool:
    """py-spy needs to read other processes' memory (ptrace rules of the machine): try it on a short child."""
    probe = workdir / "probe.stacks"
    cmd = sampled([sys.executable, "-c", "import time; time.sleep(1)"], probe)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"steps run without py-spy: {err}")
        return False
    ok = exit_status(done.stdout, done.returncode) == 0 and probe.exists() and "<module>" in probe.read_text()
    if not ok:
        print(f"steps run without py-spy, which does not work here: {(done.stdout + done.stderr)[-300:]}")
    probe.unlink(missing_ok=True)
    return ok


def where_time_went(stacks: Path) -> None:
    """Summarize the step's stacks next to its log and keep them gzipped (they are read again with stacks.py)."""
    if not stacks.exists():
        return
    text = render(summarize(read_lines(stacks)), STACK_RATE)
    stacks.with_suffix(".where.txt").write_text(text + "\n")
    with open(stacks, "rb") as src, gzip.open(f"{stacks}.gz", "wb") as dst:
        dst.writelines(src)
    stacks.unlink()
    print(text[:1500], flush=True)  # all of it is in the file


def kill_leftovers(mark: str) -> None:
    """SIGKILL what a finished step left behind (vLLM engine cores, Ray daemons and workers), found by the
    marker in their environment: they outlive the step's process group, and other processes on the machine
    are never touched."""
    needle = f"{STEP_MARK}={mark}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all")
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmark-out")))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every --snippets (CPU smoke runs: 0.01)")
    ap.add_argument("--only", default="", help="comma-separated variant labels/modules to run (default: all)")
    ap.add_argument("--stacks", choices=["sampled", "all", "none"], default="sampled",
                    help="which steps run under py-spy: those labelled *_sampled (default), all, none")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    deadline = time.time() + args.budget_s
    results = args.out / "results.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])

    done = {(r["model"], r["variant"]) for r in read_rows(results)}  # re-running a part resumes it
    sampling = args.stacks != "none" and py_spy_works(args.out)
    for n, (part, module, step_args, need_s) in enumerate(PLAN):
        label = step_args[step_args.index("--label") + 1] if "--label" in step_args else module
        if args.part not in ("all", part) or (args.only and label not in args.only.split(",")):
            continue
        if (MODEL_NAMES[part], label) in done or (module == "engines" and ("embedded", "engine_vllm") in done):
            continue
        left = deadline - time.time()
        if left < need_s:  # a step cut off at the budget's end is device time spent for nothing
            print(f"SKIP {part} {label}: {left:.0f}s left, needs ~{need_s}s", flush=True)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *scaled(step_args, args.scale)]
        print(f"RUN  {part} {label}: {' '.join(cmd[1:])} (timeout {left:.0f}s; {gpu_free()})", flush=True)
        log_path = args.out / "logs" / f"{n:02d}-{part}-{label}.log"
        stacks = log_path.with_suffix(".stacks")
        t0 = time.time()
        mark = f"{os.getpid()}-{n}"
        with open(log_path, "w") as log:
            profile = sampling and (args.stacks == "all" or label.endswith("_sampled"))
            proc = subprocess.Popen(sampled(cmd, stacks) if profile else cmd, stdout=subprocess.PIPE, stderr=log,
                                    text=True, env={**env, STEP_MARK: mark}, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=left)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                if profile:  # py-spy writes the stacks of a step that ran out of time (where it hung) on SIGINT
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: vLLM's engine core holds the GPU
                except ProcessLookupError:
                    pass
                stdout, rc = proc.communicate()[0] or "", -9
            log.write(stdout)
        rc = exit_status(stdout, rc)
        kill_leftovers(mark)  # an engine core or Ray worker that outlived its step would starve the next one
        found = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
        with open(results, "a") as f:
            for r in found:
                r.update(part=part, device=device_name(), date=time.strftime("%Y-%m-%d"), step_wall_s=round(time.time() - t0, 1))
                f.write(json.dumps(r, sort_keys=True) + "\n")
        status = "ok" if rc == 0 and found else f"FAILED rc={rc} (see {log_path})"
        print(f"DONE {part} {label}: {status} in {time.time() - t0:.0f}s", flush=True)
        if rc != 0:
            print("".join(open(log_path).readlines()[-25:]), flush=True)
        where_time_went(stacks)

    rows = read_rows(results)
    baseline = {r["model"]: r["snippets_per_s"] for r in rows if r["variant"] == "seed_replay"}
    for r in rows:
        if r["model"] in baseline and r["variant"] != "seed_replay" and not r["variant"].startswith("engine_"):
            r["speedup"] = round(r["snippets_per_s"] / baseline[r["model"]], 2)
    print(json.dumps({"device": device_name(), "versions": versions(), "rows": len(rows)}))
    if rows:
        print(table(rows, COLUMNS))


if __name__ == "__main__":
    main()
