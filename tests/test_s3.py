"""`generate` reading from and writing to `s3://`, against a real S3 API on loopback (moto's server).

Plain `s3://bucket/prefix` URIs go through pyarrow filesystems in the driver and in Ray workers alike;
AWS_ENDPOINT_URL_S3 points them (and boto3) at the local server, as a user's env would point at MinIO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_generate_from_and_to_s3(s3_env, tiny_model, corpus):
    env, client = s3_env
    body = "".join(json.dumps(row) + "\n" for row in corpus[:12]).encode() + b"{broken\n"
    client.put_object(Bucket="corpus", Key="evol/part-0.jsonl", Body=body)
    args = [sys.executable, "-m", "pipeline.cli", "generate", "--input", "s3://corpus/evol",
            "--output", "s3://corpus/runs/one", "--engine", "transformers", "--model", tiny_model,
            "--num-candidates", "2", "--max-new-tokens", "6", "--set", "model.max_model_len=1024",
            "--set", "extract.max_code_chars=3000"]
    run_env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    run_env.pop("RAY_ADDRESS", None)
    first = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    manifest = json.loads(client.get_object(Bucket="corpus", Key="runs/one/manifest.json")["Body"].read())
    assert manifest["counts"]["input"] == 13 and manifest["all_rows_accounted_for"]
    assert manifest["counts"]["rejected_by_stage_and_reason"]["read/malformed json"] == 1
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="runs/one/")["Contents"]}
    for folder in ("snippets", "candidates", "selected", "rejected"):
        assert any(k.startswith(f"runs/one/{folder}/") and k.endswith(".parquet") for k in keys), folder

    # Same command again: resumed from the markers in S3, nothing redone.
    again = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(client.get_object(Bucket="corpus", Key="runs/one/manifest.json")["Body"].read())
    assert rerun["stages"] == manifest["stages"]
