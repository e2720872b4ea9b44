"""cluster.yaml is a valid Ray cluster launcher config, and k8s/rayjob.yaml a valid KubeRay RayJob.

cluster.yaml goes through the schema that ships with Ray and through the launcher's own config preparation
(`ray up` merges the AWS defaults, then validates), with no cloud call. The RayJob is checked against
k8s/rayjob.schema.yaml, written from KubeRay's v1 API types (its $comment says what it covers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipeline.submit import JOBS

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster.yaml"
RAYJOB = REPO / "k8s" / "rayjob.yaml"
# What an access key, a secret key or a session token looks like, in any of the files a user edits.
SECRET = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|aws_session_token", re.I)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_ray_up_would_accept_cluster_yaml(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # what `ray up` runs before it calls AWS


def test_gpu_nodes_start_only_on_demand_and_within_bounds(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["resources"].get("GPU") and not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert len(workers) >= 2  # a small-GPU type for generate, a multi-GPU type for train
    for name, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        assert t["resources"]["GPU"] >= 1, name
    assert max(t["resources"]["GPU"] for t in workers.values()) >= 4
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0


def test_nodes_use_iam_roles_and_install_the_gpu_extras_with_this_ray(cluster):
    for name, t in cluster["available_node_types"].items():
        assert "IamInstanceProfile" in t["node_config"], name
    assert not SECRET.search(CLUSTER.read_text()) and not SECRET.search(RAYJOB.read_text())
    setup = "\n".join(cluster["setup_commands"])
    assert "[gpu,train]" in setup  # vLLM for generate/evaluate, peft for LoRA training
    # Every node and the submitting machine must run the same Ray.
    assert f"ray[data,train,default]=={ray.__version__}" in setup


def _rayjob_docs() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAYJOB.read_text())}


def test_kuberay_rayjob_matches_the_v1_api():
    schema = yaml.safe_load((REPO / "k8s" / "rayjob.schema.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    docs = _rayjob_docs()
    assert set(docs) == {"ServiceAccount", "RayJob"}
    job = docs["RayJob"]
    jsonschema.validate(job, schema)

    spec = job["spec"]
    assert re.fullmatch(rf"python -m ray_jobs\.({'|'.join(JOBS)}) .*--output s3://\S+", spec["entrypoint"])
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    account = docs["ServiceAccount"]["metadata"]
    assert "eks.amazonaws.com/role-arn" in account["annotations"]  # S3 through IRSA, not keys
    assert all(p["spec"]["serviceAccountName"] == account["name"] for p in pods)
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_the_rayjob_schema_rejects_what_the_api_server_would():
    schema = yaml.safe_load((REPO / "k8s" / "rayjob.schema.yaml").read_text())
    job = _rayjob_docs()["RayJob"]
    bad_cases = {
        "misspelt spec field": {**job, "spec": {**job["spec"], "shutdownAfterJobFinish": True}},
        "unknown submission mode": {**job, "spec": {**job["spec"], "submissionMode": "Batch"}},
        "non-string rayStartParams": {**job, "spec": {**job["spec"], "rayClusterSpec": {
            **job["spec"]["rayClusterSpec"],
            "headGroupSpec": {**job["spec"]["rayClusterSpec"]["headGroupSpec"], "rayStartParams": {"num-cpus": 0}}}}},
        "worker group without a name": {**job, "spec": {**job["spec"], "rayClusterSpec": {
            **job["spec"]["rayClusterSpec"],
            "workerGroupSpecs": [{k: v for k, v in g.items() if k != "groupName"}
                                 for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]}}},
    }
    for name, bad in bad_cases.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
