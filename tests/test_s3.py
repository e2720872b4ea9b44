"""`generate` reading its corpus and model from `s3://` and writing there, against a real S3 API on loopback
(moto's server).

Plain `s3://bucket/prefix` URIs go through pyarrow filesystems in the driver and in Ray workers alike;
AWS_ENDPOINT_URL_S3 points them (and boto3) at the local server, as a user's env would point at MinIO.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.process_tools import kill_session

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


class WriteGate:
    """WSGI middleware in front of the S3 server: while armed, lets the writes of the first `allow` objects
    under `prefix` through and holds the write of any further one until `release`, which fails it. A test
    that kills a run then knows exactly what reached S3, however fast the run goes."""

    def __init__(self, app) -> None:
        self.app, self.prefix, self.allow, self.armed = app, "", 0, False
        self.admitted: set[str] = set()
        self.held, self.released, self.lock = threading.Event(), threading.Event(), threading.Lock()

    def arm(self, prefix: str, allow: int) -> None:
        self.prefix, self.allow, self.armed = prefix, allow, True

    def release(self) -> None:
        self.armed = False
        self.released.set()

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if self.armed and environ["REQUEST_METHOD"] in ("PUT", "POST") and path.startswith(self.prefix) \
                and path.endswith(".parquet"):
            with self.lock:
                if len(self.admitted) < self.allow:
                    self.admitted.add(path)
                admitted = path in self.admitted
            if not admitted:
                self.held.set()
                self.released.wait(timeout=900)
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """moto's S3 server on loopback behind a `WriteGate`; the env that points a run at it, a boto3 client."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    gate = WriteGate(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, gate, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    werkzeug_log = logging.getLogger("werkzeug")
    quiet = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one INFO line per request buried a failure's own output
    host, port = server.server_address[:2]
    env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "INVERSE_INSTRUCT_HOME": str(tmp_path_factory.mktemp("home"))}  # where the model is fetched to
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="corpus")
    yield env, client, gate
    gate.release()
    server.shutdown()
    werkzeug_log.setLevel(quiet)


@pytest.fixture(scope="module")
def s3_corpus(s3_env, corpus) -> str:
    """12 real rows and one malformed line, as JSONL in the bucket."""
    _, client, _ = s3_env
    body = "".join(json.dumps(row) + "\n" for row in corpus[:12]).encode() + b"{broken\n"
    client.put_object(Bucket="corpus", Key="evol/part-0.jsonl", Body=body)
    return "s3://corpus/evol"


@pytest.fixture(scope="module")
def s3_model(s3_env, tiny_model) -> str:
    """The tiny model's folder in the bucket, as `train` writes its output model there."""
    _, client, _ = s3_env
    for file in Path(tiny_model).iterdir():
        client.put_object(Bucket="corpus", Key=f"models/tiny/{file.name}", Body=file.read_bytes())
    return "s3://corpus/models/tiny"


def _cli(model: str, source: str, output: str) -> list[str]:
    # One snippet per batch: each is written as its own file as soon as it is scored (the unit of resume).
    return [sys.executable, "-m", "pipeline.cli", "generate", "--input", source, "--output", output,
            "--engine", "transformers", "--model", model, "--num-candidates", "2", "--max-new-tokens", "6",
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
def first_run(s3_env, s3_corpus, s3_model) -> dict:
    """An uninterrupted run from s3:// to s3://; its manifest."""
    env, client, _ = s3_env
    done = subprocess.run(_cli(s3_model, s3_corpus, "s3://corpus/runs/one"), env=_run_env(env),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _manifest(client, "runs/one")


def test_generate_from_and_to_s3(s3_env, s3_corpus, s3_model, first_run):
    env, client, _ = s3_env
    manifest = first_run
    assert manifest["counts"]["input"] == 13 and manifest["all_rows_accounted_for"]
    assert manifest["counts"]["rejected_by_stage_and_reason"]["read/malformed json"] == 1
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="runs/one/")["Contents"]}
    for folder in ("snippets", "candidates", "selected", "rejected"):
        assert any(k.startswith(f"runs/one/{folder}/") and k.endswith(".parquet") for k in keys), folder

    # Same command again: resumed from the markers in S3, nothing redone.
    again = subprocess.run(_cli(s3_model, s3_corpus, "s3://corpus/runs/one"), env=_run_env(env),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _manifest(client, "runs/one")["stages"] == manifest["stages"]
    # The model was fetched from S3 once, into the node's cache, and the second run reused it.
    assert len(list(Path(env["INVERSE_INSTRUCT_HOME"], "models", "remote").glob("tiny-*"))) == 1


def test_resume_on_s3_after_the_driver_is_killed(s3_env, s3_corpus, s3_model, first_run, tmp_path):
    env, client, gate = s3_env
    args = _cli(s3_model, s3_corpus, "s3://corpus/runs/cut")
    snippets = first_run["counts"]["snippets"]
    assert snippets >= 3

    # Kill the driver (and its process group, its local Ray with it) while the third snippet's file is on its
    # way to S3: two are there, and the gate holds that write (the tiny model scores all of them in 0.3 s, so
    # a kill timed by polling S3 came after the last one now and then).
    def in_s3() -> int:
        listed = client.list_objects_v2(Bucket="corpus", Prefix="runs/cut/_work/scored/").get("Contents", [])
        return sum(o["Key"].endswith(".parquet") for o in listed)

    gate.arm("/corpus/runs/cut/_work/scored/", allow=2)
    log = tmp_path / "cut.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, env=_run_env(env), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=stderr)
        deadline = time.time() + 300
        # Both admitted writes done too (one may still be on its way when the third is held).
        while time.time() < deadline and proc.poll() is None and not (gate.held.is_set() and in_s3() == 2):
            time.sleep(0.1)
        running = proc.poll() is None
        kill_session(proc)  # the driver, the local Ray instance it started, Ray's workers
        gate.release()  # the held write fails: its writer is gone
    assert running and gate.held.is_set(), f"no third write to hold (exit {proc.returncode}):\n" \
                                           f"{log.read_text()[-3000:]}"
    assert in_s3() == 2
    assert "Contents" not in client.list_objects_v2(Bucket="corpus", Prefix="runs/cut/_stages/inverse.json")

    # Same command again, same S3 folder: only the rest is scored, and the result is the uninterrupted one.
    done = subprocess.run(args, env=_run_env(env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = _manifest(client, "runs/cut")
    # One snippet per file (batches of one): exactly the two that reached S3 are not scored again.
    assert manifest["resume"] == {"inverse_snippets_resumed": 2, "inverse_snippets_scored_now": snippets - 2,
                                  "inverse_scores_dropped": 0}
    assert manifest["all_rows_accounted_for"] and manifest["counts"] == first_run["counts"]
    for folder, keys in (("candidates", ["id", "k"]), ("selected", ["id"]), ("rejected", ["id"])):
        assert _table(env, f"corpus/runs/cut/{folder}", keys) == _table(env, f"corpus/runs/one/{folder}", keys), folder


def test_a_larger_input_limit_on_s3_keeps_what_was_scored(s3_env, s3_corpus, s3_model, first_run):
    """A trial run on a few rows, then the whole input in the same S3 folder: only the new snippets are
    scored. A scored file there twice (a run killed while it rewrote the scores) is rewritten once."""
    env, client, _ = s3_env
    trial = subprocess.run(_cli(s3_model, s3_corpus, "s3://corpus/runs/grow") + ["--limit", "6"],
                           env=_run_env(env), capture_output=True, text=True, timeout=600)
    assert trial.returncode == 0, trial.stderr[-3000:]
    scored_then = _manifest(client, "runs/grow")["counts"]["snippets"]
    key = next(o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="runs/grow/_work/scored/")["Contents"]
               if o["Key"].endswith(".parquet"))
    client.copy_object(Bucket="corpus", CopySource={"Bucket": "corpus", "Key": key},
                       Key=key.replace("scored/", "scored/again-"))

    whole = subprocess.run(_cli(s3_model, s3_corpus, "s3://corpus/runs/grow"), env=_run_env(env),
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    manifest = _manifest(client, "runs/grow")
    assert manifest["resume"] == {"inverse_snippets_resumed": scored_then, "inverse_scores_dropped": 0,
                                  "inverse_snippets_scored_now": first_run["counts"]["snippets"] - scored_then}
    assert manifest["counts"] == first_run["counts"]
    for folder, keys in (("candidates", ["id", "k"]), ("selected", ["id"]), ("rejected", ["id"])):
        assert _table(env, f"corpus/runs/grow/{folder}", keys) == _table(env, f"corpus/runs/one/{folder}", keys), folder


def test_evaluate_a_model_in_s3(s3_env, s3_model):
    """What `loop --output s3://…` does after training: evaluate the model that `train` wrote to S3."""
    env, client, _ = s3_env
    args = [sys.executable, "-m", "pipeline.cli", "evaluate", "--model", s3_model, "--benchmark", "humaneval",
            "--limit", "2", "--engine", "transformers", "--output", "s3://corpus/eval/he",
            "--set", "generation.max_new_tokens=8"]
    done = subprocess.run(args, env=_run_env(env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(client.get_object(Bucket="corpus", Key="eval/he/summary.json")["Body"].read())
    assert summary["counts"]["problems"] == 2 and summary["config"]["model"]["path"] == s3_model
    files = sorted(o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="eval/he/")["Contents"]
                   if not o["Key"].endswith("/"))
    assert files == ["eval/he/results.jsonl", "eval/he/samples.jsonl", "eval/he/summary.json"]  # _work/ removed


def test_train_from_and_to_s3(s3_env, s3_corpus, s3_model, first_run, tiny_model, tmp_path):
    """`train --output s3://…` (what `loop --output s3://…` runs after generate): its data, base model,
    checkpoints (Ray Train's storage_path), final model and report all in S3."""
    env, client, _ = s3_env
    args = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(REPO / "configs" / "train_cpu.yaml"),
            "--model", s3_model, "--generated", "s3://corpus/runs/one", "--original", s3_corpus,
            "--output", "s3://corpus/train/one", "--set", "lora.enabled=false", "--set", "data.max_length=128",
            "--set", "optim.global_batch_size=4", "--set", "checkpoint.every_steps=2"]
    done = subprocess.run(args, env=_run_env(env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = _manifest(client, "train/one")
    assert manifest["data"]["generated"]["rows"] == first_run["counts"]["selected"]  # its selected/ only
    assert manifest["data"]["original"]["rows"] == 13 and manifest["steps"] == sum(manifest["planned_steps"]) > 0
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="train/one/")["Contents"]}
    assert {"train/one/report.md", "train/one/loss.png", "train/one/model/config.json"} <= keys
    assert any(k.startswith("train/one/checkpoints/") and k.endswith("/state.json") for k in keys)

    # The model in S3 is a plain HF folder: downloaded as is, transformers loads it.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for key in (k for k in keys if k.startswith("train/one/model/")):
        (tmp_path / Path(key).name).write_bytes(client.get_object(Bucket="corpus", Key=key)["Body"].read())
    trained = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()["model.layers.0.mlp.up_proj.weight"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert trained.shape == base.shape and not torch.equal(trained, base)  # the trained weights
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == AutoTokenizer.from_pretrained(tiny_model).eos_token
