"""A wheel install (what a cluster image holds) carries everything the library reads at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_wheel_install_has_the_bundled_data_and_configs(tmp_path):
    source = tmp_path / "src"  # built from a copy: a build leaves build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("pipeline", "ray_jobs"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "wheel")],
                   check=True, timeout=300)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"),
                    *map(str, (tmp_path / "wheel").glob("*.whl"))], check=True, timeout=300)
    code = ("import pipeline, pipeline.io as io, pipeline.decontaminate as d\n"
            "from pipeline.evaluate.benchmarks import load_problems\n"
            f"assert pipeline.__file__.startswith({str(tmp_path / 'site')!r}), pipeline.__file__\n"
            "assert io.EMBEDDED_CORPUS_PATH.stat().st_size > 1e6 and d.MBPP_PATH.exists()\n"
            "print(len(load_problems('mbpp')))\n"
            # `inverse-instruct demo` reads its config from the package; the other configs are there to copy.
            "from pipeline.cli import CONFIGS, build_parser\n"
            "from pipeline.config import LoopConfig, load_config\n"
            "demo = build_parser().parse_args(['demo']).config\n"
            "assert demo.startswith(pipeline.__path__[0]), demo\n"
            "print(load_config(demo, schema=LoopConfig).generate.input.path)\n"
            "print(sorted(p.name for p in CONFIGS.glob('*.yaml')))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert run.stdout.splitlines() == ["500", "embedded", str(configs)] and "demo.yaml" in configs
