"""The run report: report.md (the numbers) and loss.png (the loss curve) in the output folder.

matplotlib is optional (GPU images may lack it): without it the Markdown is still written, with a note.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from pipeline.output import OutputDir

log = logging.getLogger("pipeline.train")


def write_report(out: OutputDir, manifest: dict[str, Any], history: list[dict[str, Any]]) -> None:
    png = loss_png(history)
    if png is None:
        log.warning("train: matplotlib is not installed, so report.md has no loss curve (pip install matplotlib)")
    else:
        with out.fs.open_output_stream(f"{out.root}/loss.png") as f:
            f.write(png)
    with out.fs.open_output_stream(f"{out.root}/report.md") as f:
        f.write(render_markdown(manifest, history, has_png=png is not None).encode())


def render_markdown(m: dict[str, Any], history: list[dict[str, Any]], has_png: bool) -> str:
    t, cfg = m["throughput"], m["config"]
    mfu = "null (no peak FLOP/s for this device; set compute.peak_flops)" if t["mfu"] is None else f"{t['mfu']:.4f}"
    lines = [
        "# Fine-tuning run",
        "",
        f"- model: `{m['model']}` ({'LoRA' if cfg['lora']['enabled'] else 'full fine-tune'}, "
        f"prompt format `{m['prompt_format']}`, packing {'on' if cfg['data']['packing'] else 'off'}, "
        f"max length {m['max_length']})",
        f"- schedule `{cfg['data']['schedule']}`: " + " → ".join(f"`{p}`" for p in m["phases"]),
        f"- data: generated `{m['sources']['generated']}`, original `{m['sources']['original']}`",
        f"- workers: {cfg['compute']['num_workers']} ({'GPU' if cfg['compute']['use_gpu'] else 'CPU'}, "
        f"{cfg['compute']['strategy']}); global batch {cfg['optim']['global_batch_size']} sequences, "
        f"{cfg['optim']['name']} lr {cfg['optim']['lr']}",
        f"- steps: {m['steps']} (planned per pass {m['planned_steps']}, done per pass {m['steps_per_phase']})",
        f"- restarts: resumed from step(s) {m['resumed_from_step'] or 'none'}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| trained tokens (input, all workers) | {t['tokens']:,} |",
        f"| response tokens (with loss) | {t['label_tokens']:,} |",
        f"| training seconds (steps, waiting for data included; without checkpoint saves) | {t['train_seconds']} |",
        f"| of which waiting for data | {_wait(t)} |",
        f"| tokens/s | {t['tokens_per_s']} |",
        f"| MFU (6 × params × tokens/s ÷ peak) | {mfu} |",
        f"| loss first → last step | {_fmt(m['loss']['first'])} → {_fmt(m['loss']['last'])} |",
        "",
        "## Data",
        "",
        "| source | rows | trained examples | dropped | sequences | tokens | by status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in sorted(m["data"].items()):
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(c["by_status"].items()))
        lines.append(f"| {name} | {c['rows']} | {c['examples']} | {c['dropped']} | {c['sequences']} | "
                     f"{c['tokens']:,} | {statuses} |")
    lines += ["", "## Loss", ""]
    lines.append("![loss curve](loss.png)" if has_png else "_loss.png not written: matplotlib is not installed._")
    return "\n".join(lines) + "\n"


def loss_png(history: list[dict[str, Any]]) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="." if len(history) < 50 else None)
    for prev, cur in zip(history, history[1:]):  # pass boundaries
        if cur["phase"] != prev["phase"]:
            ax.axvline(prev["step"] + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over response tokens)")
    ax.set_title("training loss (dotted: next pass of the schedule)")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def data_wait_share(t: dict[str, Any]) -> float | None:
    """The share of the steps' time spent waiting for data (None in a manifest from before it was measured)."""
    wait, total = t.get("data_wait_seconds"), t.get("train_seconds")
    return wait / total if wait is not None and total else None


def _wait(t: dict[str, Any]) -> str:
    share = data_wait_share(t)
    return "n/a" if share is None else f"{t['data_wait_seconds']} s ({share:.0%})"
