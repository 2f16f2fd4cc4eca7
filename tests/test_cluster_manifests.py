"""Every manifest under cluster/ validates: KubeRay v1.7.0 CRDs (strictly) plus the operator's own rules; the
cluster-launcher config against Ray's schema and Ray's own config validation; embedded job specs as specs."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from fengshen_batch.io.spec_files import fill_dates
from fengshen_batch.spec import build_spec

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((ROOT / "cluster").glob("*.yaml"))
KUBE_MANIFESTS = [p for p in MANIFESTS if p.name != "ray-cluster-aws.yaml"]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _strict(schema: dict) -> dict:
    """kubeconform-like strictness: unknown fields rejected unless the schema preserves them, and
    x-kubernetes-int-or-string as integer-or-string."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def _crd_schema(kind: str) -> dict:
    plural = {"RayJob": "rayjobs", "RayCronJob": "raycronjobs", "RayCluster": "rayclusters"}[kind]
    crd = yaml.load(
        (CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayjob_rules(name: str, spec: dict) -> None:
    """Rules the KubeRay operator enforces in code, not in the CRD."""
    assert len(name) <= 47 and DNS_1035.match(name), f"RayJob name {name!r} is not a DNS-1035 label <= 47"
    if spec.get("ttlSecondsAfterFinished", 0) > 0:
        assert spec.get("shutdownAfterJobFinishes") is True, (
            "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
        )
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
        "exactly one of rayClusterSpec, clusterSelector"
    )
    if "activeDeadlineSeconds" in spec:
        assert spec["activeDeadlineSeconds"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", "the head runs no GPU work"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def _check_job_specs(doc: dict) -> None:
    for key, value in doc.get("data", {}).items():
        if key == "job.yaml":
            build_spec(yaml.safe_load(fill_dates(value, "2026-11-21")))


def _check(doc: dict) -> None:
    kind = doc["kind"]
    assert doc["apiVersion"] and doc["metadata"]["name"]
    if kind in ("RayJob", "RayCronJob", "RayCluster"):
        jsonschema.validate(doc, _crd_schema(kind))
    if kind == "RayJob":
        _rayjob_rules(doc["metadata"]["name"], doc["spec"])
    elif kind == "RayCronJob":
        _rayjob_rules(doc["metadata"]["name"], doc["spec"]["jobTemplate"])
    elif kind == "ConfigMap":
        _check_job_specs(doc)
        for key, value in doc["data"].items():
            if key == "rayjob.yaml":  # a RayJob template: validate it as created on a given night
                _check(yaml.safe_load(value.replace("RUN_DATE", "20261121")))


needs_crds = pytest.mark.skipif(
    not CRDS.exists(), reason="../shared/kuberay-crds is absent: no CRD schemas to validate against"
)


@needs_crds
@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path):
    docs = _documents(path)
    for doc in docs:
        _check(doc)
    kinds = {d["kind"] for d in docs}
    assert kinds & {"RayJob", "RayCronJob", "CronJob"}


@needs_crds
def test_strict_validation_rejects_an_unknown_field():
    doc = _documents(ROOT / "cluster" / "rayjob-nightly-score.yaml")[1]
    doc["spec"]["shutdownAfterJobFinish"] = True  # a typo
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(doc, _crd_schema("RayJob"))


def test_cron_schedules_create_one_rayjob_per_night():
    cron = {d["kind"]: d for d in _documents(ROOT / "cluster" / "cronjob-nightly-score.yaml")}
    script = cron["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][
        -1
    ]
    assert "already exists" in script and "kubectl create" in script
    rules = cron["Role"]["rules"][0]
    assert rules["apiGroups"] == ["ray.io"] and "create" in rules["verbs"] and "rayjobs" in rules["resources"]


def test_cluster_launcher_config_validates():
    import json

    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster-aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own checks, on the config as `ray up` fills it in
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and config["available_node_types"]["head"]["resources"]["GPU"] == 0


def test_dockerfile_uses_a_ray_gpu_image_and_installs_the_project():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:[\d.]+-py3\d+-gpu", text, re.M)
    assert "pip install --no-cache-dir ." in text


def _pods(doc: dict):
    """(role, pod spec) of a RayJob's head and worker groups."""
    spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    cluster = spec["rayClusterSpec"]
    yield "head", cluster, cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield "worker", cluster, group["template"]["spec"]


@needs_crds
def test_ray_clusters_are_hardened():
    """Issue 32: Ray token auth on the dashboard and Jobs API, non-root pods without privilege escalation or
    capabilities, and no service-account token on workers (the head's autoscaler needs its own)."""
    jobs = []
    for path in KUBE_MANIFESTS:
        for doc in _documents(path):
            if doc["kind"] in ("RayJob", "RayCronJob"):
                jobs.append(doc)
            for key, value in (doc.get("data") or {}).items():
                if key == "rayjob.yaml":
                    jobs.append(yaml.safe_load(value.replace("RUN_DATE", "20261121")))
    assert len(jobs) == 3
    for doc in jobs:
        for role, cluster, pod in _pods(doc):
            assert cluster["authOptions"] == {"mode": "token"}
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod.get("automountServiceAccountToken", True) is (role == "head")
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
