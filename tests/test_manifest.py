"""The run manifest's record of what ran: the code's commit next to the package versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.manifest import source_commit, versions


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_is_recorded_and_uncommitted_changes_are_flagged(tmp_path):
    """The package version stays 0.1.0 from one commit to the next: a manifest could not tell which code
    wrote an output folder (a resumed run, a rerun after a fix)."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert source_commit(tmp_path) == head
    (tmp_path / "b.py").write_text("new file, not tracked\n")
    assert source_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == f"{head}-dirty"
    assert source_commit(tmp_path / "not-a-checkout") is None  # a wheel install, a Ray job's uploaded copy


def test_the_versions_name_this_checkouts_commit():
    assert versions()["source"].split("-")[0] == _git(Path(__file__).resolve().parent.parent,
                                                      "rev-parse", "--short=12", "HEAD")
