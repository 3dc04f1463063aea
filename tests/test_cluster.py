"""Cluster configs: cluster/aws.yaml against the cluster-launcher schema inside the ray package,
the KubeRay manifests (cluster/kuberay/ and those `vidgen schedule --emit-kuberay` writes) against
the KubeRay CRDs in ../shared/kuberay-crds/, and the RayService's Serve config against
serve/config.yaml.

The CRDs are data kept beside the repository: in CI (CI=true) a missing CRD fails these tests;
elsewhere they are skipped with that reason.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO.parent / "shared" / "kuberay-crds"
KUBERAY = REPO / "cluster" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


# --------------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema


def _to_json_schema(node):
    """An OpenAPI v3 structural schema as JSON Schema: `x-kubernetes-*` extensions dropped, `nullable`
    as a null type, int-or-string as either, and objects that list their properties closed (the API
    server prunes unknown fields silently; here a misspelt field fails) unless they preserve unknown
    fields."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[str, dict]:
    missing = [f for f in CRD_FILES.values() if not (CRDS / f).is_file()]
    if missing:
        reason = f"KubeRay CRDs missing from {CRDS}: {', '.join(missing)}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " (required in CI)")
        pytest.skip(reason)
    schemas = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 74k lines
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[kind] = _to_json_schema(version["schema"]["openAPIV3Schema"])
    return schemas


@pytest.fixture(scope="module")
def crd_schemas():
    return _crd_schemas()


def validate_manifest(doc: dict, schemas: dict[str, dict]) -> None:
    """Raise AssertionError (naming the path) unless `doc` is a valid object of its kind."""
    import jsonschema

    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "")
    assert DNS_SUBDOMAIN.match(name), f"{kind}: metadata.name {name!r} is not a DNS subdomain"
    if kind == "ConfigMap":
        assert doc.get("apiVersion") == "v1"
        for key, value in (doc.get("data") or {}).items():
            assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), f"ConfigMap {name}: bad key {key!r}"
            assert isinstance(value, str), f"ConfigMap {name}: data.{key} must be a string"
        return
    assert kind in schemas, f"unexpected kind {kind!r}"
    assert doc.get("apiVersion") == "ray.io/v1", f"{kind} {name}: apiVersion {doc.get('apiVersion')!r}"
    errors = sorted(jsonschema.Draft7Validator(schemas[kind]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{kind} {name}: " + "; ".join(
        f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message[:200]}" for e in errors[:5])


def manifests(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --------------------------------------------------------------------------------------------
# Tests


def test_aws_cluster_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` does: defaults filled in, then checked
    nodes = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert {"head", "cpu_encode", "gpu"} <= set(nodes)
    for node in nodes.values():
        assert "instance-profile/" in node["node_config"]["IamInstanceProfile"]["Arn"]  # S3 via the node's role
    assert nodes["gpu"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert sum(n.get("min_workers", 0) for n in nodes.values()) <= config["max_workers"]
    assert any(re.search(r"vidgen @ git\+\S+@v?[\w.]+\"", c) for c in config["setup_commands"])  # a pinned ref
    text = (REPO / "cluster" / "aws.yaml").read_text()
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text


def test_kuberay_manifests_validate_against_the_crds(crd_schemas):
    files = sorted(KUBERAY.glob("*.yaml"))
    kinds = set()
    for path in files:
        if path.name == "serve-overrides.yaml":
            continue
        for doc in manifests(path):
            validate_manifest(doc, crd_schemas)
            kinds.add(doc["kind"])
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob"} <= kinds


def test_the_validator_rejects_what_kubernetes_would_drop_or_refuse(crd_schemas):
    (doc,) = [d for d in manifests(KUBERAY / "raycronjob-ads-daily.yaml") if d["kind"] == "RayCronJob"]
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["schedul"] = misspelt["spec"].pop("schedule")
    with pytest.raises(AssertionError, match="schedul"):
        validate_manifest(misspelt, crd_schemas)
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(AssertionError, match="maxReplicas"):
        validate_manifest(wrong_type, crd_schemas)


def test_manifests_run_the_dockerfiles_image_and_this_ray():
    import ray

    from vidgen import jobs

    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"rayproject/ray:{re.escape(ray.__version__)}-py311", dockerfile)
    assert "ffmpeg" in dockerfile and "pip install" in dockerfile
    image = jobs.load_schedules(str(REPO / "jobs" / "schedules.yaml")).kuberay.image
    text = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert set(re.findall(r"image: (\S+)", text)) == {image}
    assert set(re.findall(r"rayVersion: \"?([\d.]+)", text)) == {ray.__version__}
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text

    def env_entries(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "env" and isinstance(v, list):
                    yield from v
                else:
                    yield from env_entries(v)
        elif isinstance(node, list):
            for v in node:
                yield from env_entries(v)

    secrets = [e for p in KUBERAY.glob("*.yaml") for d in manifests(p) for e in env_entries(d)
               if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", e["name"])]
    assert secrets, "the RayService's API token comes from a Secret"
    for e in secrets:  # secrets only by reference, never as a value in a manifest
        assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


def test_emitted_raycronjobs_validate(crd_schemas, tmp_path):
    from vidgen import cli, jobs

    assert cli.main(["schedule", str(REPO / "jobs" / "schedules.yaml"), "--emit-kuberay", str(tmp_path)]) == 0
    schedules = jobs.load_schedules(str(REPO / "jobs" / "schedules.yaml"))
    for entry in schedules.entries:
        docs = manifests(tmp_path / f"raycronjob-{entry.name}.yaml")
        for doc in docs:
            validate_manifest(doc, crd_schemas)
        configmap, cronjob = docs
        assert cronjob["spec"]["schedule"] == entry.cron and cronjob["spec"]["timeZone"] == entry.timezone
        batch = jobs.batch_uri(str(REPO / "jobs" / "schedules.yaml"), entry)
        spec_key = Path(batch).name
        assert configmap["data"][spec_key] == Path(batch).read_text()  # the spec's content travels
        entrypoint = cronjob["spec"]["jobTemplate"]["entrypoint"]
        assert f"--spec /etc/vidgen/batch/{spec_key}" in entrypoint and entry.timezone in entrypoint
        head = cronjob["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    # The checked-in ad cron job is what the generator writes for that entry.
    assert manifests(KUBERAY / "raycronjob-ads-daily.yaml") == manifests(tmp_path / "raycronjob-ads-daily.yaml"), (
        "cluster/kuberay/raycronjob-ads-daily.yaml is stale: vidgen schedule jobs/schedules.yaml --emit-kuberay out/ "
        "&& cp out/raycronjob-ads-daily.yaml cluster/kuberay/")


def test_rayservice_serve_config_is_generated_from_serve_config():
    if not (REPO / "serve" / "config.yaml").is_file():
        pytest.skip("serve/config.yaml does not exist: nothing to compare the RayService's serveConfigV2 with")
    spec = importlib.util.spec_from_file_location("sync_serve_config", KUBERAY / "sync_serve_config.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    expected = sync.expected_serve_config()
    assert sync.embedded_serve_config() == expected, "run: python cluster/kuberay/sync_serve_config.py"
    assert expected["http_options"]["host"] == "0.0.0.0"  # the Kubernetes Service must reach the proxies
    # The merged settings are ones the application accepts.
    from vidgen import serving

    (app,) = [a for a in expected["applications"] if a["import_path"].startswith("vidgen.serving:")]
    settings = serving.load_settings(app["args"])
    assert str(settings.output_root).startswith("s3://")
