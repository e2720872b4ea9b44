"""`inverse-instruct submit` against a real Ray cluster on loopback, through the Jobs API (dashboard).

The cluster is `ray start --head --block` in a private temp dir on free ports, so it neither collides with
other local Ray instances nor gets joined by them (its address file lives in its own temp dir, and no
RAY_ADDRESS is exported). It is stopped by terminating exactly its own process tree, never `ray stop`,
which would end every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests

from pipeline.config import RuntimeEnvConfig, SubmitConfig
from pipeline.submit import JOBS, entrypoint, runtime_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the cluster's workers and the job's `python` come from this venv


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` and every process it started (workers, the job's driver), then SIGKILL
    what is left: only this cluster's own processes, found from the tree before any of them exits."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster() -> str:
    """A one-node Ray cluster with the dashboard (Jobs API) on 127.0.0.1; yields its http:// address."""
    temp = tempfile.mkdtemp(prefix="ii-ray-")  # short: Ray's unix socket paths must stay under ~107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, renv, node_mgr, obj_mgr = _free_ports(9)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--temp-dir", temp,
           "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(150 * 2**20),
           "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(renv),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"no Jobs API after 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield address
    finally:
        _stop_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, *job: str) -> subprocess.CompletedProcess:
    """`inverse-instruct submit` as a user runs it, from the repo root (the uploaded working_dir)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(VENV_BIN / "inverse-instruct"), "submit", "--address", address, *job],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _job_id(stderr: str) -> str:
    found = re.search(r"submitted (\S+):", stderr)
    assert found, stderr[-2000:]
    return found.group(1)


def test_generate_job_runs_on_the_cluster_and_reports_success(cluster, tiny_model, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "run"
    t0 = time.perf_counter()
    done = _submit(cluster, "generate", "--input", "embedded", "--limit", "20", "--output", str(out),
                   "--engine", "transformers", "--model", tiny_model, "--num-candidates", "2",
                   "--max-new-tokens", "6", "--set", "model.max_model_len=1024",
                   "--set", "extract.max_code_chars=3000")
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"\nsubmit -> SUCCEEDED round trip: {seconds:.1f} s (stage seconds in the job: {manifest['seconds']})")

    # The driver's own summary line came back through the streamed logs.
    assert "20 input rows ->" in done.stdout and "SUCCEEDED" in done.stderr
    assert re.search(r"ray: joined the cluster at [\d.]+:\d+ \(1 node\(s\), 2 CPUs, 0 GPUs now\)", done.stdout)
    jobs = JobSubmissionClient(cluster)
    job_id = _job_id(done.stderr)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert jobs.get_job_info(job_id).entrypoint.startswith("python -m ray_jobs.generate --input embedded")

    assert manifest["counts"]["input"] == 20 and manifest["all_rows_accounted_for"]
    assert manifest["counts"]["selected"] >= 1
    for folder in ("snippets", "candidates", "selected", "rejected"):
        assert list((out / folder).glob("*.parquet")), folder


def test_a_bad_config_fails_the_job_with_the_error_in_its_logs(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    done = _submit(cluster, "generate", "--output", str(tmp_path / "bad"), "--set", "summarize.num_candidats=3")
    assert done.returncode == 1, done.stderr[-3000:]
    error = "summarize.num_candidats: unknown config key (did you mean `num_candidates`?)"
    assert error in done.stdout  # streamed to the submitter
    job_id = _job_id(done.stderr)
    jobs = JobSubmissionClient(cluster)
    assert jobs.get_job_status(job_id) == JobStatus.FAILED
    assert error in jobs.get_job_logs(job_id)  # and kept on the cluster
    assert "FAILED" in done.stderr and not (tmp_path / "bad").exists()


def test_a_relative_output_is_refused_in_the_job_not_written_into_rays_working_dir_copy(cluster):
    """A relative --output (every config's default is one) resolves in the job's cwd: Ray's temporary copy of the
    uploaded working_dir. Until 2026-12-06 the job wrote its results there and printed "outputs in outputs/generate"."""
    done = _submit(cluster, "generate", "--input", "embedded", "--limit", "2")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "output: outputs/generate is inside this Ray job's copy of its working_dir" in done.stdout
    assert "runtime_resources" in done.stdout and "stage preprocess" not in done.stdout


def test_unknown_job_and_unreachable_cluster_are_errors_before_any_upload():
    with pytest.raises(ValueError, match="unknown job 'generat'"):
        entrypoint("generat", [])
    assert {"generate", "train", "evaluate", "loop"} <= set(JOBS)
    port = _free_ports(1)[0]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([str(VENV_BIN / "inverse-instruct"), "submit", "--address", f"http://127.0.0.1:{port}",
                           "generate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error:" in done.stderr


def test_the_working_dir_upload_leaves_out_venv_outputs_and_git(tmp_path):
    """Built with Ray's own packaging, as the Jobs client builds it (it also honours .gitignore)."""
    from ray._private.runtime_env.packaging import create_package

    env = runtime_env(SubmitConfig().runtime_env)
    assert env["working_dir"] == str(REPO) and env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    package = tmp_path / "pkg.zip"
    create_package(env["working_dir"], package, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    size_mib = package.stat().st_size / 2**20
    print(f"\nworking_dir upload: {size_mib:.2f} MiB zipped, {len(names)} entries")
    assert "pipeline/submit.py" in names and "ray_jobs/generate.py" in names and "pipeline/data/mbpp.jsonl" in names
    for left_out in (".venv/", ".git/", "outputs/", ".gpuwheels/", "__pycache__/"):
        assert not any(n.startswith(left_out) or f"/{left_out}" in n for n in names), left_out
    assert size_mib < 20
    # A remote package URI is passed through as is; excludes only apply to a local folder.
    remote = runtime_env(RuntimeEnvConfig(working_dir="s3://b/pkg.zip", pip=["rich"], env_vars={"A": "1"}))
    assert remote == {"working_dir": "s3://b/pkg.zip", "pip": ["rich"], "env_vars": {"PYTHONUNBUFFERED": "1", "A": "1"}}


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_the_job_on_the_cluster(stop, code, cluster, tiny_model, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(VENV_BIN / "inverse-instruct"), "submit", "--address", cluster, "generate",
                             "--limit", "400", "--output", str(tmp_path / "long"), "--engine", "transformers",
                             "--model", tiny_model, "--set", "model.max_model_len=1024"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # as typed in a terminal: a shell's background job (CI started with `&`) inherits an
                            # ignored SIGINT, and Python then leaves Ctrl-C ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        job_id = next(m.group(1) for line in proc.stderr if (m := re.search(r"submitted (\S+):", line)))
        stderr: list[str] = []  # read on: a full pipe would block the command's exit
        threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
        jobs = JobSubmissionClient(cluster)
        deadline = time.monotonic() + 120
        while jobs.get_job_status(job_id) != JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.send_signal(stop)
        try:
            assert proc.wait(timeout=60) == code
        except subprocess.TimeoutExpired:  # say where it waits
            stack = subprocess.run([str(VENV_BIN / "py-spy"), "dump", "--pid", str(proc.pid)],
                                   capture_output=True, text=True).stdout if (VENV_BIN / "py-spy").exists() else ""
            pytest.fail(f"no exit 60 s after {stop.name}; its stack:\n{stack}\nits stderr:\n{''.join(stderr)[-3000:]}")
        while not jobs.get_job_status(job_id).is_terminal() and time.monotonic() < deadline + 60:
            time.sleep(0.5)
        assert jobs.get_job_status(job_id) == JobStatus.STOPPED
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_job_started_by_a_python_without_the_requirements_says_what_it_lacks(tmp_path):
    """A cluster started by a venv's `ray start` without the venv active runs `python -m ray_jobs.JOB` with another
    python: one line naming it and what it lacks (was a ModuleNotFoundError traceback from pipeline/generate.py)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = tmp_path / "bare" / "bin" / "python"
    done = subprocess.run([str(bare), "-m", "ray_jobs.generate", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {bare}, the `python` this job runs in, has no ray, pandas, pyarrow, ")
    ours = subprocess.run([sys.executable, "-m", "ray_jobs.generate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert ours.returncode == 0 and ours.stdout.startswith("usage: inverse-instruct generate")
