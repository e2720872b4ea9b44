"""`generate` reading from and writing to `s3://`, against a real S3 API on loopback (moto's server).

Plain `s3://bucket/prefix` URIs go through pyarrow filesystems in the driver and in Ray workers alike;
AWS_ENDPOINT_URL_S3 points them (and boto3) at the local server, as a user's env would point at MinIO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.process_tools import kill_session

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3_env():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="corpus")
    yield env, client
    server.stop()


@pytest.fixture(scope="module")
def s3_corpus(s3_env, corpus) -> str:
    """12 real rows and one malformed line, as JSONL in the bucket."""
    _, client = s3_env
    body = "".join(json.dumps(row) + "\n" for row in corpus[:12]).encode() + b"{broken\n"
    client.put_object(Bucket="corpus", Key="evol/part-0.jsonl", Body=body)
    return "s3://corpus/evol"


def _cli(tiny_model: str, source: str, output: str) -> list[str]:
    # One snippet per batch: each is written as its own file as soon as it is scored (the unit of resume).
    return [sys.executable, "-m", "pipeline.cli", "generate", "--input", source, "--output", output,
            "--engine", "transformers", "--model", tiny_model, "--num-candidates", "2", "--max-new-tokens", "6",
            "--set", "model.max_model_len=1024", "--set", "extract.max_code_chars=3000",
            "--set", "compute.batch_size=1"]


def _run_env(env: dict[str, str]) -> dict[str, str]:
    run_env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    run_env.pop("RAY_ADDRESS", None)
    return run_env


def _manifest(client, prefix: str) -> dict:
    return json.loads(client.get_object(Bucket="corpus", Key=f"{prefix}/manifest.json")["Body"].read())


def _table(env: dict[str, str], folder: str, sort: list[str]) -> list[dict]:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL_S3"], access_key="test", secret_key="test",
                           region="us-east-1")
    table = pads.dataset(folder, filesystem=s3, format="parquet").to_table()
    return table.sort_by([(c, "ascending") for c in sort]).to_pylist()


@pytest.fixture(scope="module")
def first_run(s3_env, s3_corpus, tiny_model) -> dict:
    """An uninterrupted run from s3:// to s3://; its manifest."""
    env, client = s3_env
    done = subprocess.run(_cli(tiny_model, s3_corpus, "s3://corpus/runs/one"), env=_run_env(env),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _manifest(client, "runs/one")


def test_generate_from_and_to_s3(s3_env, s3_corpus, tiny_model, first_run):
    env, client = s3_env
    manifest = first_run
    assert manifest["counts"]["input"] == 13 and manifest["all_rows_accounted_for"]
    assert manifest["counts"]["rejected_by_stage_and_reason"]["read/malformed json"] == 1
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="runs/one/")["Contents"]}
    for folder in ("snippets", "candidates", "selected", "rejected"):
        assert any(k.startswith(f"runs/one/{folder}/") and k.endswith(".parquet") for k in keys), folder

    # Same command again: resumed from the markers in S3, nothing redone.
    again = subprocess.run(_cli(tiny_model, s3_corpus, "s3://corpus/runs/one"), env=_run_env(env),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _manifest(client, "runs/one")["stages"] == manifest["stages"]


def test_resume_on_s3_after_the_driver_is_killed(s3_env, s3_corpus, tiny_model, first_run):
    env, client = s3_env
    args = _cli(tiny_model, s3_corpus, "s3://corpus/runs/cut")

    # Kill the driver (and its process group, its local Ray with it) once some snippets are in S3.
    proc = subprocess.Popen(args, env=_run_env(env), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        listed = client.list_objects_v2(Bucket="corpus", Prefix="runs/cut/_work/scored/").get("Contents", [])
        if sum(o["Key"].endswith(".parquet") for o in listed) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    kill_session(proc)  # the driver, the local Ray instance it started, Ray's workers
    assert "Contents" not in client.list_objects_v2(Bucket="corpus", Prefix="runs/cut/_stages/inverse.json")

    # Same command again, same S3 folder: only the rest is scored, and the result is the uninterrupted one.
    done = subprocess.run(args, env=_run_env(env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = _manifest(client, "runs/cut")
    assert manifest["resume"]["inverse_snippets_resumed"] >= 2
    assert manifest["resume"]["inverse_snippets_scored_now"] >= 1
    assert manifest["all_rows_accounted_for"] and manifest["counts"] == first_run["counts"]
    for folder, keys in (("candidates", ["id", "k"]), ("selected", ["id"]), ("rejected", ["id"])):
        assert _table(env, f"corpus/runs/cut/{folder}", keys) == _table(env, f"corpus/runs/one/{folder}", keys), folder
