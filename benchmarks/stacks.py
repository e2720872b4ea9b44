"""Where a GPU benchmark step's time went: py-spy's sampled stacks of every process the step started.

    python -m benchmarks.stacks STEP.stacks[.gz] [--min-share 0.02] [--depth 16] [--rate 50] [--json]

run_gpu.py runs its *_sampled steps (every step with --stacks all) under `py-spy record --subprocesses --idle
--nonblocking --format raw` when py-spy can read processes on the machine (--nonblocking: no process is ever
paused; py-spy still takes CPU of its own). Both paths are bound by per-token work in vLLM's engine core, not
by the GPU (benchmarks/RESULTS.md, "Where the time goes"); this names that work. Three loops are summarized,
each as a tree of the functions below it with their share of the loop's samples. Idle frames are included, so
the shares are of wall time: waiting for the GPU or for a socket shows up as the frame that waits.
- engine core: vLLM's busy loop (`run_busy_loop`), in its own process (one per engine);
- model worker: where the model runs in a process of its own (`worker_busy_loop`: vLLM's multiprocess
  executor, e.g. on CPUs or with tensor parallelism; with one GPU the engine core runs the model itself);
- feeding loop: the thread that adds requests and takes outputs: our EngineLoop in the factory actor, or
  `LLM.generate`'s `_run_engine` in seed_replay.
A chain of calls that each make only the one call below them is printed on one line ("a › b › c (file)").
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

LOOPS = {"engine core": ("run_busy_loop",), "model worker": ("worker_busy_loop",),
         "feeding loop": ("EngineLoop._serve", "_run_engine")}  # LLM._run_engine (0.26), a mixin's (0.32)
# A Python frame in py-spy's raw format: "function (file:line)". Process frames ("process PID:"cmdline"") may
# hold any character, ';' included, so a loop's frames are found by pattern, never by splitting the line.
_FRAME = r"[^;()]*\([^;()]*:\d+\)"
_PROCESS = re.compile(r'process (\d+):"')


def _loop_pattern(names: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?:^|;)((?:[\w.<>]*\.)?(?:{alternatives}) \([^;()]*:\d+\))((?:;{_FRAME})*) (\d+)$")


def _function(frame: str) -> str:
    """'Scheduler.schedule (vllm/v1/core/sched/scheduler.py:312)' -> the same without ':312'."""
    return re.sub(r":\d+\)$", ")", frame)


def records(lines) -> list[str]:
    """py-spy's raw lines, one per stack: a process frame holds that process's command line, which may hold
    newlines (`python -c "..."`), so a record ends only at a line that ends in a sample count."""
    out, pending = [], ""
    for line in lines:
        pending += line
        if re.search(r" \d+\n?$", line):
            out.append(pending.rstrip("\n"))
            pending = ""
    return out


def summarize(lines, min_share: float = 0.02, depth: int = 16) -> dict:
    """Per loop: its samples, how many processes ran it, the tree of frames below it (shares of the loop's
    samples, children of at least `min_share`) and the functions that were on top of the stack (self time)."""
    out, stacks = {}, records(lines)
    for loop, names in LOOPS.items():
        pattern = _loop_pattern(names)
        tree: dict = {}
        leaves: Counter = Counter()
        pids: set[str] = set()
        total = 0
        for line in stacks:
            m = pattern.search(line)
            if not m:
                continue
            count = int(m.group(3))
            total += count
            head = line[:m.start(1)]
            pids.update(_PROCESS.findall(head)[-1:])
            frames = [_function(f) for f in m.group(2).split(";")[1:]]
            leaves[frames[-1] if frames else "(the loop itself)"] += count
            node = tree
            for frame in frames[:depth]:
                entry = node.setdefault(frame, [0, {}])
                entry[0] += count
                node = entry[1]
        if total:
            out[loop] = {"samples": total, "processes": len(pids),
                         "tree": _prune(tree, total, min_share),
                         "self": [[f, round(c / total, 3)] for f, c in leaves.most_common(15)]}
    return out


def _prune(tree: dict, total: int, min_share: float) -> list:
    """[[frame, share, children], ...], largest first; a frame whose samples all went to one callee is
    folded into one entry with it."""
    out = []
    for frame, (count, children) in sorted(tree.items(), key=lambda kv: -kv[1][0]):
        if count / total < min_share:
            continue
        chain = [frame]
        while len(children) == 1 and next(iter(children.values()))[0] == count:
            [(callee, (_, children))] = children.items()
            chain.append(callee)
        name = " › ".join([f.split(" (")[0] for f in chain[:-1]] + [chain[-1]])
        out.append([name, round(count / total, 3), _prune(children, total, min_share)])
    return out


def render(summary: dict, rate: int | None = None) -> str:
    text = []
    for loop, s in summary.items():
        seconds = f", {s['samples'] / rate:.0f} s in all" if rate else ""
        text.append(f"## {loop}: {s['samples']} samples in {s['processes']} process(es){seconds}")
        text.append("share of the loop's wall time, by call tree (children >= the minimum share):")
        text.extend(_tree_lines(s["tree"], 0))
        text.append("on top of the stack (self):")
        text.extend(f"  {share:6.1%}  {frame}" for frame, share in s["self"])
        text.append("")
    return "\n".join(text) if text else "no samples of vLLM's loops (did the step start an engine?)"


def _tree_lines(nodes: list, level: int) -> list[str]:
    lines = []
    for frame, share, children in nodes:
        lines.append(f"  {share:6.1%}  {'  ' * level}{frame}")
        lines.extend(_tree_lines(children, level + 1))
    return lines


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as f:
        return f.readlines()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stacks", type=Path)
    ap.add_argument("--min-share", type=float, default=0.02)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--rate", type=int, default=None, help="py-spy's samples per second (prints seconds)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    args = ap.parse_args()
    summary = summarize(read_lines(args.stacks), args.min_share, args.depth)
    print(json.dumps(summary) if args.json else render(summary, args.rate))


if __name__ == "__main__":
    main()
