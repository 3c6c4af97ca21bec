"""The Helm chart helm/scdd, checked without a cluster.

Renders go through the real Helm engine (helm-python-sdk embeds Helm's Go SDK: no helm binary);
every built-in Kubernetes object is validated with kubernetes-validate (strict: unknown fields
fail) against the oldest Kubernetes the chart supports and the newest the package ships; the
RayCluster's pod templates are validated the same way as v1 PodTemplates, and its own fields are
checked against KubeRay's ray.io/v1 types here. The job bounds the chart derives from its GPU group are
checked where they act: the service's Settings built from the rendered environment, its admission, and
(for 64 GPUs) the API under uvicorn against a real redis-server.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
from functools import cache
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from service.auth import ApiKeys, Limits
from service.settings import Settings

CHART = Path(__file__).resolve().parents[1] / "helm" / "scdd"
RELEASE, NAMESPACE = "demo", "ml"
FULLNAME = "demo-scdd"
CLUSTER = "demo-scdd-ray"

# Chart.yaml's kubeVersion floor (or the oldest schema shipped) and the newest schema shipped.
_SHIPPED = sorted({v.rsplit(".", 1)[0] for v in all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
K8S_VERSIONS = ("1.25" if "1.25" in _SHIPPED else _SHIPPED[0], _SHIPPED[-1])

STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
                   "helm.sh/chart")

# KubeRay's ray.io/v1 RayCluster fields (ray-operator/apis/ray/v1/raycluster_types.go, KubeRay 1.1 to 1.6).
RAYCLUSTER_SPEC_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                          "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
                          "workerGroupSpecs", "authOptions"}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                     "upscalingMode", "env", "envFrom", "volumeMounts", "version"}

CPU_GROUP = {"groupName": "cpu", "minReplicas": 0, "maxReplicas": 3, "shmSize": "4Gi",
             "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}}
VALUE_SETS: dict[str, dict] = {
    "default": {},
    "external-redis": {"redis": {"external": {"url": "redis://redis.db.svc:6379/0"}}},
    "external-redis-secret": {"redis": {"external": {"existingSecret": "redis-conn"}}},
    "gpu-max-0": {"ray": {"workers": {"maxReplicas": 0}}},
    "gpu-max-8": {"ray": {"workers": {"minReplicas": 1, "maxReplicas": 8, "gpus": 2,
                                      "nodeSelector": {"nvidia.com/gpu.present": "true"}}}},
    "ingress": {"ingress": {"enabled": True, "className": "nginx",
                            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
                            "hosts": [{"host": "scdd.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                            "tls": [{"secretName": "scdd-tls", "hosts": ["scdd.example.com"]}]}},
    "hpa-on": {"api": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6,
                                       "targetMemoryUtilizationPercentage": 80}}},
    "hpa-off": {"api": {"autoscaling": {"enabled": False}, "replicas": 3}},
    # every other switch the chart has, flipped
    "existing-secrets-static-ray": {
        "apiKeys": {"existingSecret": "scdd-keys", "existingSecretKey": "keys.yaml"},
        "ray": {"auth": {"existingSecret": "ray-token"}, "autoscaler": {"enabled": False},
                "workers": {"replicas": 9, "minReplicas": 1, "maxReplicas": 2, "tmpSizeLimit": "50Gi"},
                "additionalWorkerGroups": [CPU_GROUP], "head": {"numCpus": None, "tmpSizeLimit": "10Gi"}},
        "s3": {"endpointUrl": "https://minio.example:9000", "region": "us-east-1", "existingSecret": "s3-keys"},
        "sharedVolumes": [{"name": "datasets", "mountPath": "/usr/share/datasets",
                           "volume": {"persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}}],
        "redis": {"auth": {"enabled": False}, "persistence": {"enabled": False}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/scdd"}},
        "api": {"pdb": {"maxUnavailable": "50%"}},
        "networkPolicy": {"apiFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]},
        "image": {"repository": "registry.example/ml/scdd", "tag": "0.1.0", "pullSecrets": [{"name": "regcred"}]},
        "extraEnv": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}],
    },
    "egress-open": {"networkPolicy": {"egress": False}},
    "no-gpu-group-no-policies": {"ray": {"workers": {"enabled": False}, "additionalWorkerGroups": [CPU_GROUP],
                                         "auth": {"enabled": False}},
                                 "networkPolicy": {"enabled": False}, "tests": {"enabled": False},
                                 "gc": {"enabled": False}},
}
# The sizes docs/deployment.md works through, as the files users pass with -f: 8 GPUs (8 pods x 1, 1 x 8), 64 (8 x 8).
EXAMPLES = {path.stem: path for path in sorted((CHART / "examples").glob("*.yaml"))}
VALUE_SETS.update({name: yaml.safe_load(path.read_text()) for name, path in EXAMPLES.items()})


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@cache
def _render(name: str) -> tuple[dict[str, list[dict]], str]:
    """(objects by kind, NOTES.txt) of one value set; each set is rendered once per test session."""
    with helm.Chart.load(CHART) as loaded:
        files = loaded.render(copy.deepcopy(VALUE_SETS[name]), name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in files.items() if path.endswith("NOTES.txt"))
    kinds: dict[str, list[dict]] = {}
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                kinds.setdefault(doc["kind"], []).append(doc)
    return kinds, notes


def objects(name: str) -> list[dict]:
    return [doc for docs in _render(name)[0].values() for doc in docs]


def of_kind(name: str, kind: str) -> list[dict]:
    return _render(name)[0].get(kind, [])


def one(name: str, kind: str, obj_name: str) -> dict:
    found = [doc for doc in of_kind(name, kind) if doc["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"{kind}/{obj_name} in {name}: {len(found)} found"
    return found[0]


def pod_templates(name: str) -> list[tuple[str, dict]]:
    """(where, pod template or Pod) of every workload: Deployments, StatefulSets, hook Pods, Ray groups."""
    found = []
    for kind in ("Deployment", "StatefulSet"):
        found += [(f"{kind}/{d['metadata']['name']}", d["spec"]["template"]) for d in of_kind(name, kind)]
    found += [(f"Pod/{p['metadata']['name']}", p) for p in of_kind(name, "Pod")]
    for cluster in of_kind(name, "RayCluster"):
        found.append((f"RayCluster/{cluster['metadata']['name']}/head", cluster["spec"]["headGroupSpec"]["template"]))
        for group in cluster["spec"].get("workerGroupSpecs") or []:
            found.append((f"RayCluster/{cluster['metadata']['name']}/{group['groupName']}", group["template"]))
    return found


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def container(name: str, kind: str, obj_name: str) -> dict:
    return one(name, kind, obj_name)["spec"]["template"]["spec"]["containers"][0]


def raycluster(name: str) -> dict:
    (cluster,) = of_kind(name, "RayCluster")
    return cluster


def worker_groups(name: str) -> dict[str, dict]:
    return {group["groupName"]: group for group in raycluster(name)["spec"].get("workerGroupSpecs") or []}


def ray_pod_templates(name: str) -> list[tuple[str, dict]]:
    cluster = raycluster(name)
    return [("head", cluster["spec"]["headGroupSpec"]["template"])] + \
        [(group["groupName"], group["template"]) for group in cluster["spec"].get("workerGroupSpecs") or []]


# --- Helm itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name):
    report = helm.lint(CHART, copy.deepcopy(VALUE_SETS[name]) or None, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error (1 is info)
    assert not problems and not report["errors"], report


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2" and meta["type"] == "application" and meta["name"] == "scdd"
    for field in ("version", "appVersion", "kubeVersion", "description", "keywords"):
        assert meta.get(field), field
    assert chart.schema["additionalProperties"] is False


@pytest.mark.parametrize(("values", "message"), [
    ({"api": {"replicas": "two"}}, "at '/api/replicas': got string, want integer"),
    ({"replicaCount": 3}, "at '': additional properties 'replicaCount' not allowed"),
    ({"ray": {"workers": {"gpus": "1"}}}, "at '/ray/workers/gpus': got string, want integer"),
    ({"ray": {"workers": {"maxReplicas": -1}}}, "at '/ray/workers/maxReplicas': minimum: got -1, want 0"),
    ({"ray": {"workerz": {}}}, "at '/ray': additional properties 'workerz' not allowed"),
    ({"ray": {"additionalWorkerGroups": [{"groupName": "cpu"}]}},
     "at '/ray/additionalWorkerGroups/0': missing properties 'minReplicas', 'maxReplicas'"),
    ({"redis": {"external": {"url": "localhost:6379"}}}, "at '/redis/external/url'"),
    ({"apiKeys": {"extraTenants": {"team": {"keys_sha256": ["not-a-hash"]}}}},
     "at '/apiKeys/extraTenants/team/keys_sha256/0'"),
    ({"ray": {"clusterName": "c" * 45}}, "at '/ray/clusterName': maxLength"),  # "<name>-head-svc" must fit
    ({"ray": {"clusterName": "1ray"}}, "at '/ray/clusterName'"),  # KubeRay wants a DNS-1035 label
    ({"ray": {"maxRestarts": -1}}, "at '/ray/maxRestarts': minimum: got -1, want 0"),
    ({"ray": {"head": {"sizing": {"memoryPerJob": "3Gi"}}}},
     "at '/ray/head/sizing': additional properties 'memoryPerJob' not allowed"),
    ({"config": {"maxWorkers": 0}}, "at '/config/maxWorkers': minimum: got 0, want 1"),
    ({"apiKeys": {"extraTenants": {"team": {"keys_sha256": [], "limits": {"max_gpus": 2}}}}},
     "at '/apiKeys/extraTenants/team/limits': additional properties 'max_gpus' not allowed"),
])
def test_schema_rejects_bad_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "values don't meet the specifications of the schema(s)" in str(caught.value)
    assert message in str(caught.value)
    report = helm.lint(CHART, values, strict=True)  # `helm lint` says the same
    assert any(message in error for error in report["errors"]), report


@pytest.mark.parametrize(("values", "message"), [
    ({"ray": {"workers": {"minReplicas": 3, "maxReplicas": 1}}},
     'ray worker group "gpu": minReplicas (3) must not exceed maxReplicas (1)'),
    ({"ray": {"additionalWorkerGroups": [{"groupName": "gpu", "minReplicas": 0, "maxReplicas": 1}]}},
     'ray worker groups: groupName "gpu" is used twice'),
    ({"api": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
     "api.autoscaling.minReplicas (5) must not exceed api.autoscaling.maxReplicas (2)"),
    ({"fullnameOverride": "9lives"}, 'the RayCluster name "9lives-ray" is not a DNS-1035 label'),
    ({"ray": {"workers": {"gpus": 8, "resources": {"requests": {"cpu": "7500m", "memory": "64Gi"}}}}},
     'ray worker group "gpu": 8 GPUs per pod but 7500m CPUs (resources.requests.cpu): each job worker asks for 1 CPU'),
    ({"ray": {"additionalWorkerGroups": [{"groupName": "h100", "minReplicas": 0, "maxReplicas": 1, "gpus": 4}]}},
     'ray worker group "h100": 4 GPUs per pod but 2 CPUs'),  # the 2-CPU default of an additional group
])
def test_inconsistent_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match="execution error") as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(caught.value)


# --- Kubernetes schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_builtin_objects_are_valid_kubernetes(name, version):
    checked = 0
    for doc in objects(name):
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({version}): {where}: {error.message}")
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_raycluster_pod_templates_are_valid_kubernetes(name, version):
    cluster = raycluster(name)
    for group, template in ray_pod_templates(name):
        as_pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{CLUSTER}-{group}"}, "template": template}
        try:
            kubernetes_validate.validate(as_pod_template, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{group} template ({version}): {'.'.join(map(str, error.path))}: {error.message}")
    options = cluster["spec"].get("autoscalerOptions")
    if options:  # what KubeRay merges into its autoscaler sidecar container
        sidecar = {"name": "autoscaler", "image": "x", **{k: options[k] for k in
                                                          ("env", "resources", "securityContext", "volumeMounts")}}
        head = copy.deepcopy(cluster["spec"]["headGroupSpec"]["template"])
        head["spec"]["containers"].append(sidecar)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": head}, version, strict=True)


# --- the RayCluster -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_raycluster_fields(name):
    values = VALUE_SETS[name].get("ray", {})
    cluster = raycluster(name)
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"] == CLUSTER
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    autoscaling = values.get("autoscaler", {}).get("enabled", True)
    assert spec["enableInTreeAutoscaling"] is autoscaling
    if autoscaling:
        assert set(spec["autoscalerOptions"]) <= AUTOSCALER_FIELDS
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    if values.get("head", {}).get("numCpus", "0") is None:
        assert "num-cpus" not in head["rayStartParams"]
    else:
        assert head["rayStartParams"]["num-cpus"] == "0"  # no job lands on the head
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"  # KubeRay's Ray container is index 0
    for group in spec.get("workerGroupSpecs", []):
        assert set(group) <= WORKER_GROUP_FIELDS
        assert group["template"]["spec"]["containers"][0]["name"] == "ray-worker"
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        if autoscaling:  # the autoscaler owns replicas (a chart value would fight it on every upgrade)
            assert "replicas" not in group
        else:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in spec.get("workerGroupSpecs", [])]:
        assert all(isinstance(value, str) for value in params.values())  # map[string]string in KubeRay


def test_gpu_worker_group_defaults():
    group = worker_groups("default")["gpu"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 8)  # scales to zero when idle
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shared-mem")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "shared-mem", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_gpu_max_replicas_0_keeps_the_group_and_never_starts_a_pod():
    group = worker_groups("gpu-max-0")["gpu"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 0)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gpu_max_replicas_8():
    group = worker_groups("gpu-max-8")["gpu"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 8)
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_static_cluster_and_additional_cpu_group():
    groups = worker_groups("existing-secrets-static-ray")
    assert list(groups) == ["gpu", "cpu"]
    assert groups["gpu"]["replicas"] == 2  # 9 clamped to maxReplicas
    cpu = groups["cpu"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert "tolerations" not in cpu
    assert next(v for v in cpu["volumes"] if v["name"] == "shared-mem")["emptyDir"]["sizeLimit"] == "4Gi"
    assert list(worker_groups("no-gpu-group-no-policies")) == ["cpu"]


def test_head_runs_under_an_account_the_autoscaler_can_use():
    head = raycluster("default")["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == f"{FULLNAME}-ray-head" and head["automountServiceAccountToken"] is True
    account = one("default", "ServiceAccount", f"{FULLNAME}-ray-head")
    assert account["automountServiceAccountToken"] is True
    static = raycluster("existing-secrets-static-ray")["spec"]["headGroupSpec"]["template"]["spec"]
    assert static["serviceAccountName"] == FULLNAME and static["automountServiceAccountToken"] is False
    assert [a["metadata"]["name"] for a in of_kind("existing-secrets-static-ray", "ServiceAccount")] == [FULLNAME]


def test_ray_pods_set_their_own_http_probes():
    """KubeRay injects wget-based exec probes into Ray containers without probes; ours use Ray's
    health endpoints, which answer without the auth token."""
    for name in ("default", "existing-secrets-static-ray"):
        for group, template in ray_pod_templates(name):
            ray = template["spec"]["containers"][0]
            for probe in ("livenessProbe", "readinessProbe"):
                assert ray[probe]["httpGet"]["path"] in ("/api/gcs_healthz", "/api/local_raylet_healthz"), group


# --- workloads: security, resources, probes, labels --------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_pod_is_restricted(name):
    for where, template in pod_templates(name):
        pod = template["spec"]
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000, where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in containers(template):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (where, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], (where, c["name"])  # writable /tmp
            for mount in c.get("volumeMounts", []):  # every mount names a volume of the pod
                assert mount["name"] in volumes or mount["name"] in _claim_templates(name, where), (where, mount)
        if where.startswith("RayCluster/"):
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp/ray"]] and mounts["/tmp/ray"] == "ray-logs", where
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
    options = raycluster(name)["spec"].get("autoscalerOptions")
    if options:
        assert options["securityContext"]["readOnlyRootFilesystem"] is True
        assert options["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert {"name": "tmp", "mountPath": "/tmp"} in options["volumeMounts"]


def _claim_templates(name: str, where: str) -> set[str]:
    if not where.startswith("StatefulSet/"):
        return set()
    sts = one(name, "StatefulSet", where.split("/", 1)[1])
    return {claim["metadata"]["name"] for claim in sts["spec"].get("volumeClaimTemplates", [])}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_has_resources(name):
    for where, template in pod_templates(name):
        for c in template["spec"]["containers"]:
            resources = c["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), (where, c["name"])
            assert "memory" in resources["limits"], (where, c["name"])
    options = raycluster(name)["spec"].get("autoscalerOptions")
    if options:
        assert {"cpu", "memory"} <= set(options["resources"]["requests"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes(name):
    api = container(name, "Deployment", f"{FULLNAME}-api")
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    dispatcher = container(name, "Deployment", f"{FULLNAME}-dispatcher")
    assert not any(probe in dispatcher for probe in ("livenessProbe", "readinessProbe", "startupProbe"))
    for sts in of_kind(name, "StatefulSet"):
        redis = sts["spec"]["template"]["spec"]["containers"][0]
        assert all("redis-cli" in " ".join(redis[p]["exec"]["command"])
                   for p in ("startupProbe", "livenessProbe", "readinessProbe"))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_standard_labels(name):
    for doc in objects(name):
        labels = doc["metadata"]["labels"]
        missing = [key for key in STANDARD_LABELS if key not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/part-of"] == "scdd"
    for where, template in pod_templates(name):
        missing = [key for key in STANDARD_LABELS if key not in template["metadata"]["labels"]]
        assert not missing, f"{where} pods lack {missing}"
    for kind in ("Deployment", "StatefulSet"):
        for doc in of_kind(name, kind):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
            assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector  # immutable
    pods = [template["metadata"]["labels"] for _, template in pod_templates(name)]
    for service in of_kind(name, "Service"):  # every Service selects some pod of the chart
        assert any(service["spec"]["selector"].items() <= labels.items() for labels in pods), service


# --- wiring: environment, secrets, services -----------------------------------------------------


def _settings_from(c: dict, monkeypatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("SCDD_") or k in ("REDIS_URL", "RAY_ADDRESS")]:
        monkeypatch.delenv(key)
    for item in c["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    return Settings()


@pytest.mark.parametrize("name", ["default", "existing-secrets-static-ray"])
def test_service_settings_parse_from_the_rendered_environment(name, monkeypatch):
    # every SCDD_* variable is a setting, but the Redis password REDIS_URL is composed from
    fields = {f"SCDD_{field.upper()}" for field in Settings.model_fields} | {"SCDD_REDIS_PASSWORD"}
    for deployment in ("api", "dispatcher"):
        c = container(name, "Deployment", f"{FULLNAME}-{deployment}")
        names = {item["name"] for item in c["env"] if item["name"].startswith("SCDD_")}
        assert names <= fields, names - fields  # no misspelt setting
        settings = _settings_from(c, monkeypatch)
        assert settings.ray_jobs_url == f"http://{CLUSTER}-head-svc:8265"
        assert settings.artifacts == "s3://scdd-artifacts/service" and settings.max_running == 2
        assert settings.redis_url.endswith("-redis:6379/0")
    api = env_of(container(name, "Deployment", f"{FULLNAME}-api"))
    assert api["SCDD_API_KEYS_FILE"]["value"] == "/etc/scdd/api-keys/api-keys.yaml"


@pytest.mark.parametrize("name, gpus, workers", [
    ("default", "8", "8"), ("gpu-max-8", "16", "16"), ("gpus-8x1", "8", "8"), ("gpus-1x8", "8", "8"),
    ("gpus-64", "64", "64"), ("gpu-max-0", "0", "8"), ("no-gpu-group-no-policies", "0", "8"),
    ("existing-secrets-static-ray", "2", "2")])
def test_job_bounds_default_to_the_gpu_groups_size(name, gpus, workers):
    """SCDD_MAX_GPUS = the worker groups' gpus x maxReplicas (what the cluster can ever hold), and SCDD_MAX_WORKERS
    the same (8 without GPUs), unless set; every scdd pod gets the same values."""
    users = [container(name, "Deployment", f"{FULLNAME}-{d}") for d in ("api", "dispatcher")]
    users += [t["spec"]["containers"][0] for _, t in ray_pod_templates(name)]
    for c in users:
        env = env_of(c)
        assert (env["SCDD_MAX_GPUS"]["value"], env["SCDD_MAX_WORKERS"]["value"]) == (gpus, workers)


@pytest.mark.parametrize("name, cpus, memory", [
    ("default", "8", "48"), ("gpus-1x8", "64", "480"), ("gpus-8x1", "8", "48"), ("gpu-max-0", None, None),
    ("existing-secrets-static-ray", "8", "48"), ("no-gpu-group-no-policies", "4", "16")])
def test_node_bounds_come_from_the_largest_worker_group_that_can_start_a_pod(name, cpus, memory, monkeypatch, tmp_path):
    """SCDD_NODE_CPUS / SCDD_NODE_MEMORY_GIB: the largest worker group with maxReplicas > 0 (its CPU limit, else
    request; its memory limit), unset without one (gpu-max-0: the API then uses its own machine's); the API
    refuses resources.threads above them (the Ray entrypoint's CPU request could never be placed)."""
    from api_schema import JobSpec
    from service.budget import over_budget
    from service.auth import Tenant

    c = container(name, "Deployment", f"{FULLNAME}-api")
    env = env_of(c)
    assert (env.get("SCDD_NODE_CPUS", {}).get("value"), env.get("SCDD_NODE_MEMORY_GIB", {}).get("value")) == \
        (cpus, memory)
    assert "SCDD_MAX_JOB_MEMORY_GIB" not in env  # config.maxJobMemoryGib: null
    settings = _settings_from(c, monkeypatch)
    if cpus is None:
        assert settings.node_cpus is None and settings.node_memory_gib is None
        return
    assert (settings.node_cpus, settings.node_memory_gib) == (int(cpus), float(memory))
    tenant = Tenant("acme", 4, settings.default_limits)
    job = {"dataset": {"classes": [0, 1]}, "resources": {"threads": int(cpus)}}
    assert over_budget(JobSpec.model_validate(job), tenant, settings=settings) == []
    job["resources"]["threads"] += 1
    ((loc, message),) = over_budget(JobSpec.model_validate(job), tenant, settings=settings)
    assert loc == ("body", "resources", "threads") and f"more than the {cpus} CPUs" in message
    assert "(SCDD_NODE_CPUS)" in message


def test_node_bounds_and_the_memory_limit_set_in_config_win(chart):
    env = _dispatcher_env(_render_values(chart, {"config": {"nodeCpus": 3, "nodeMemoryGib": 1.5,
                                                            "maxJobMemoryGib": 40}}))
    assert [env[k]["value"] for k in ("SCDD_NODE_CPUS", "SCDD_NODE_MEMORY_GIB", "SCDD_MAX_JOB_MEMORY_GIB")] == \
        ["3", "1.5", "40"]
    mixed = {"ray": {"workers": {"maxReplicas": 0}, "additionalWorkerGroups": [
        {"groupName": "small", "minReplicas": 0, "maxReplicas": 2},  # the chart's default 2 CPU / 8Gi
        {"groupName": "big", "minReplicas": 0, "maxReplicas": 1, "rayStartParams": {"num-cpus": "12"},
         "resources": {"requests": {"cpu": "7500m", "memory": "16G"}}}]}}
    env = _dispatcher_env(_render_values(chart, mixed))
    assert (env["SCDD_NODE_CPUS"]["value"], env["SCDD_NODE_MEMORY_GIB"]["value"]) == ("12", "14.900390625")  # 16e9 B


def _render_values(chart, values: dict) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE).items():
        for doc in ([] if path.endswith("NOTES.txt") else yaml.safe_load_all(text)):
            if doc:
                kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def _dispatcher_env(kinds: dict[str, list[dict]]) -> dict[str, dict]:
    (dispatcher,) = [d for d in kinds["Deployment"] if d["metadata"]["name"] == f"{FULLNAME}-dispatcher"]
    return env_of(dispatcher["spec"]["template"]["spec"]["containers"][0])


def test_job_bounds_set_in_config_win_and_additional_gpu_groups_count(chart):
    env = _dispatcher_env(_render_values(chart, {"config": {"maxGpus": 3}}))
    assert (env["SCDD_MAX_GPUS"]["value"], env["SCDD_MAX_WORKERS"]["value"]) == ("3", "3")
    env = _dispatcher_env(_render_values(chart, {"config": {"maxGpus": 0, "maxWorkers": 12}}))
    assert (env["SCDD_MAX_GPUS"]["value"], env["SCDD_MAX_WORKERS"]["value"]) == ("0", "12")
    h100 = {"groupName": "h100", "minReplicas": 0, "maxReplicas": 2, "gpus": 8,
            "resources": {"requests": {"cpu": "64", "memory": "512Gi"}, "limits": {"memory": "512Gi"}}}
    env = _dispatcher_env(_render_values(chart, {"ray": {"additionalWorkerGroups": [h100]}}))
    assert (env["SCDD_MAX_GPUS"]["value"], env["SCDD_MAX_WORKERS"]["value"]) == ("24", "24")  # 8 x 1 + 2 x 8


@pytest.mark.parametrize("name, cpu, memory", [("default", "2", "11Gi"), ("gpus-8x1", "3", "18Gi"),
                                              ("gpus-1x8", "2", "11Gi"), ("gpus-64", "5", "32Gi")])
def test_head_is_sized_for_the_jobs_it_hosts(name, cpu, memory):
    """Without ray.head.resources the head gets 1 CPU + 0.5 per running job, 4Gi + 3.5Gi per running job
    (config.maxRunning): its GCS and dashboard, and each job's driver with its Ray Train controller."""
    head = raycluster(name)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"] == {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}


def test_head_resources_set_in_values_win(chart):
    mine = {"requests": {"cpu": "3", "memory": "6Gi"}, "limits": {"memory": "12Gi"}}
    (cluster,) = _render_values(chart, {"ray": {"head": {"resources": mine}}})["RayCluster"]
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] == mine
    sized = {"ray": {"head": {"sizing": {"memoryPerJobMi": 1536, "milliCpuPerJob": 250}}}, "config": {"maxRunning": 3}}
    (cluster,) = _render_values(chart, sized)["RayCluster"]
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "1750m", "memory": "8704Mi"}, "limits": {"memory": "8704Mi"}}


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_says_what_follows_from_it_and_the_manual_shows_it(name):
    """The example files' headers state the derived bounds and the head's size; docs/deployment.md shows each file."""
    text = EXAMPLES[name].read_text()
    env = env_of(container(name, "Deployment", f"{FULLNAME}-api"))
    gpus, workers = env["SCDD_MAX_GPUS"]["value"], env["SCDD_MAX_WORKERS"]["value"]
    assert f"Derived: SCDD_MAX_GPUS {gpus}, SCDD_MAX_WORKERS {workers} (a job of {workers} workers is admitted, " \
           f"{int(workers) + 1} refused)" in text
    head = raycluster(name)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert f"the Ray head {head['requests']['cpu']} CPUs / {head['limits']['memory']}" in text
    manual = (CHART.parents[1] / "docs" / "deployment.md").read_text()
    assert text in manual, f"docs/deployment.md does not show helm/scdd/examples/{name}.yaml as it is"


def _settings_of(name: str, monkeypatch, **overrides) -> Settings:
    return _settings_from(container(name, "Deployment", f"{FULLNAME}-api"), monkeypatch).model_copy(update=overrides)


def _job(workers: int = 1, ipc: int = 1, iterations: int = 2, **fields) -> dict:
    """An ImageNet-1K job spec (the root is under the chart's data root, config.dataRoots)."""
    dataset = {"name": "imagefolder", "root": "/usr/share/datasets/imagenet", "classes": list(range(1000))}
    return {"method": "sre2l", "dataset": dataset, "recover": {"ipc": ipc, "iterations": iterations},
            "resources": {"workers": workers}, **fields}


@pytest.mark.parametrize("name, most", [("gpus-8x1", 8), ("gpus-1x8", 8), ("gpus-64", 64)])
def test_the_rendered_bounds_admit_a_job_on_every_gpu_and_refuse_one_more(name, most, monkeypatch, tmp_path):
    from api_schema import JobSpec
    from service.admission import AdmissionError, admit
    from service.auth import Tenant

    settings = _settings_of(name, monkeypatch, artifacts=str(tmp_path))
    tenant = Tenant("acme", settings.max_active_jobs, settings.default_limits)
    for workers in (8, most):
        admit(JobSpec.model_validate(_job(workers)), tenant, "j-1", settings)
    with pytest.raises(AdmissionError) as refused:
        admit(JobSpec.model_validate(_job(most + 1)), tenant, "j-2", settings)
    assert f"over the limit of {most} per job" in str(refused.value) and "SCDD_MAX_WORKERS" in str(refused.value)
    assert f"(SCDD_MAX_GPUS={most})" in str(refused.value)


@pytest.mark.parametrize("method, iterations", [("sre2l", 4000), ("scdd", 1000)])
def test_the_default_budgets_admit_the_papers_imagenet_runs(method, iterations, monkeypatch, tmp_path):
    """SRe2L ImageNet-1K: IPC 50 x 1000 classes x 4000 iterations = 2e8 image-iterations; SC-DD: 1000 iterations.
    The chart's defaults admit them (with room: 1e9), and give a job days, not one."""
    from api_schema import JobSpec
    from service.admission import admit
    from service.auth import Tenant

    settings = _settings_of("gpus-64", monkeypatch, artifacts=str(tmp_path))
    tenant = Tenant("acme", settings.max_active_jobs, settings.default_limits)
    spec = _job(64, ipc=50, iterations=iterations, method=method)
    assert admit(JobSpec.model_validate(spec), tenant, "j-1", settings)["recover"]["iterations"] == iterations
    assert settings.max_image_iterations >= 5 * 50 * 1000 * 4000
    assert settings.job_timeout_s >= 3 * 86400


def test_the_api_built_from_the_64_gpu_chart_admits_64_workers_and_refuses_65(redis_server, monkeypatch, tmp_path):
    """The real API (uvicorn, redis-server) with the settings the chart renders for 64 GPUs: 202, then a 422 naming
    the bounds."""
    from service.api.main import create_app
    from tests.services import ApiServer

    settings = _settings_of("gpus-64", monkeypatch, redis_url=redis_server.url, ray_address=None,
                            api_keys="acme=key-acme", api_keys_file=None, artifacts=str(tmp_path / "artifacts"))
    assert (settings.max_workers, settings.max_gpus) == (64, 64)
    server = ApiServer(create_app(settings)).start()
    try:
        with server.client("key-acme") as acme:
            accepted = acme.post("/v1/jobs", json=_job(64))
            assert accepted.status_code == 202, accepted.text
            assert accepted.json()["spec"]["resources"]["workers"] == 64
            refused = acme.post("/v1/jobs", json=_job(65))
            assert refused.status_code == 422, refused.text
            message = refused.json()["message"]
            assert "resources.workers: 65 workers asked, over the limit of 64 per job for tenant 'acme' " \
                   "(limits.max_workers in the API key file, else SCDD_MAX_WORKERS)" in message
            assert "hold 65 GPUs, more than this service runs at once (SCDD_MAX_GPUS=64)" in message
    finally:
        server.stop()


@pytest.mark.parametrize("name, device", [("default", "cuda"), ("gpu-max-0", "cuda"),
                                          ("existing-secrets-static-ray", "cuda"), ("no-gpu-group-no-policies", "cpu")])
def test_worker_device_and_placement_wait_come_from_the_chart(name, device, monkeypatch):
    """device auto follows the configured GPU group (cuda even while it is scaled to zero), not the GPUs up;
    every Ray pod (where a job's driver runs) gets the device and the placement wait, 600 s by default."""
    from workers.cluster import decide_device, placement_timeout_from_env

    for where, template in ray_pod_templates(name):
        env = env_of(template["spec"]["containers"][0])
        assert env["SCDD_WORKER_DEVICE"]["value"] == device, where
        assert env["SCDD_PLACEMENT_TIMEOUT_S"]["value"] == "900", where
        assert env["SCDD_MAX_RESTARTS"]["value"] == "3", where
        monkeypatch.setenv("SCDD_PLACEMENT_TIMEOUT_S", env["SCDD_PLACEMENT_TIMEOUT_S"]["value"])
        assert placement_timeout_from_env() == 900.0
        assert decide_device("auto", env["SCDD_WORKER_DEVICE"]["value"], local_cluster=False,
                             local_cuda=False).gpus is (device == "cuda")
    dispatcher_env = env_of(container(name, "Deployment", f"{FULLNAME}-dispatcher"))
    assert dispatcher_env["SCDD_MAX_RESTARTS"]["value"] == "3"
    dispatcher = _settings_from(container(name, "Deployment", f"{FULLNAME}-dispatcher"), monkeypatch)
    # the dispatcher passes them on in each Ray job's environment
    assert (dispatcher.worker_device, dispatcher.placement_timeout_s, dispatcher.max_restarts) == (device, 900.0, 3)


def test_worker_device_and_placement_wait_set_in_values_win(chart):
    kinds = _render_values(chart, {"ray": {"workerDevice": "cpu", "placementTimeoutS": 1800, "maxRestarts": 0}})
    (cluster,) = kinds["RayCluster"]
    for env in [env_of(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]), _dispatcher_env(kinds)]:
        assert (env["SCDD_WORKER_DEVICE"]["value"], env["SCDD_PLACEMENT_TIMEOUT_S"]["value"],
                env["SCDD_MAX_RESTARTS"]["value"]) == ("cpu", "1800", "0")
    users = [container("gpus-64", "Deployment", f"{FULLNAME}-dispatcher")]  # eight 8-GPU nodes from zero: 1200 s
    users += [t["spec"]["containers"][0] for _, t in ray_pod_templates("gpus-64")]
    assert {env_of(c)["SCDD_PLACEMENT_TIMEOUT_S"]["value"] for c in users} == {"1200"}
    with pytest.raises(Exception, match="workerDevice"):
        chart.render({"ray": {"workerDevice": "gpu"}}, name=RELEASE, namespace=NAMESPACE)


def test_generated_api_key_is_accepted_by_the_service(tmp_path, monkeypatch):
    secret = one("default", "Secret", f"{FULLNAME}-api-keys")
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    keys_file = tmp_path / "api-keys.yaml"
    keys_file.write_bytes(base64.b64decode(secret["data"]["api-keys.yaml"]))
    assert key.startswith("scdd_") and len(key) == 48
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert yaml.safe_load(keys_file.read_text()) == {"tenants": {"default": {"keys_sha256": [digest]}}}
    keys = ApiKeys.load(None, str(keys_file), default_quota=8)
    assert keys.tenant_for(key).name == "default" and keys.tenant_for(key + "x") is None
    api = one("default", "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]
    volume = next(v for v in api["volumes"] if v["name"] == "api-keys")["secret"]
    assert volume["secretName"] == f"{FULLNAME}-api-keys"
    assert volume["items"] == [{"key": "api-keys.yaml", "path": "api-keys.yaml"}]
    # the API app builds from the container's environment, the mounted key file in place
    from service.api.main import create_app

    settings = _settings_from(api["containers"][0], monkeypatch)
    app = create_app(settings.model_copy(update={"api_keys_file": str(keys_file)}))
    assert app.state.keys.tenant_for(key).name == "default"


def test_extra_tenants_join_the_generated_key_file(chart, tmp_path):
    digest = "ab" * 32
    limits = {"max_workers": 2, "max_image_iterations": 10**7, "max_epochs": 50, "max_wall_clock_s": 3600}
    files = chart.render({"apiKeys": {"generatedTenant": "ops", "extraTenants": {
        "vision-team": {"keys_sha256": [digest], "max_active_jobs": 4},
        "ops": {"keys_sha256": ["cd" * 32], "max_active_jobs": 2, "limits": limits}}}},
        name=RELEASE, namespace=NAMESPACE)
    secret = next(d for d in yaml.safe_load_all(files["scdd/templates/secrets.yaml"])
                  if d["metadata"]["name"].endswith("api-keys"))
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_bytes(base64.b64decode(secret["data"]["api-keys.yaml"]))
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    tenants = yaml.safe_load(keys_file.read_text())["tenants"]
    assert tenants["vision-team"] == {"keys_sha256": [digest], "max_active_jobs": 4}
    assert tenants["ops"]["keys_sha256"] == [hashlib.sha256(key.encode()).hexdigest(), "cd" * 32]
    keys = ApiKeys.load(None, str(keys_file), default_quota=8, default_limits=Limits(64, 10**9, 1000, 604800))
    assert keys.tenant_for(key).max_active_jobs == 2 and len(keys) == 3
    assert keys.tenant_for(key).limits == Limits(**limits)  # the tenant's own limits win over the config.max* ones


def test_existing_api_key_secret_is_mounted_and_none_generated():
    name = "existing-secrets-static-ray"
    assert f"{FULLNAME}-api-keys" not in {s["metadata"]["name"] for s in of_kind(name, "Secret")}
    api = one(name, "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]
    volume = next(v for v in api["volumes"] if v["name"] == "api-keys")["secret"]
    assert volume["secretName"] == "scdd-keys" and volume["items"] == [{"key": "keys.yaml", "path": "api-keys.yaml"}]


def _secret_ref(item: dict) -> tuple[str, str]:
    ref = item["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize(("name", "secret"), [("default", f"{FULLNAME}-ray-auth"),
                                              ("existing-secrets-static-ray", "ray-token")])
def test_ray_token_auth(name, secret):
    users = [("dispatcher", container(name, "Deployment", f"{FULLNAME}-dispatcher"))]
    users += [(group, template["spec"]["containers"][0]) for group, template in ray_pod_templates(name)]
    options = raycluster(name)["spec"].get("autoscalerOptions")
    if options:
        users.append(("autoscaler", options))
    for who, c in users:
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", who
        assert _secret_ref(env["RAY_AUTH_TOKEN"]) == (secret, "auth_token"), who
    assert "RAY_AUTH_TOKEN" not in env_of(container(name, "Deployment", f"{FULLNAME}-api"))  # /readyz needs none
    generated = [s for s in of_kind(name, "Secret") if s["metadata"]["name"] == f"{FULLNAME}-ray-auth"]
    assert len(generated) == (secret == f"{FULLNAME}-ray-auth")
    for s in generated:
        assert len(base64.b64decode(s["data"]["auth_token"])) == 48


def test_ray_auth_off():
    name = "no-gpu-group-no-policies"
    for _, template in ray_pod_templates(name):
        assert "RAY_AUTH_MODE" not in env_of(template["spec"]["containers"][0])
    assert not [s for s in of_kind(name, "Secret") if s["metadata"]["name"].endswith("-ray-auth")]


def test_ray_address_points_at_kuberays_head_service():
    for deployment in ("api", "dispatcher"):
        env = env_of(container("default", "Deployment", f"{FULLNAME}-{deployment}"))
        assert env["RAY_ADDRESS"]["value"] == f"http://{CLUSTER}-head-svc:8265"
    head = raycluster("default")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "dashboard", "containerPort": 8265} in head["ports"]
    assert "RAY_ADDRESS" not in env_of(head)  # KubeRay sets it to the GCS inside Ray pods


def test_s3_credentials_reach_the_api_and_ray_pods_only():
    name = "existing-secrets-static-ray"
    with_s3 = [("api", container(name, "Deployment", f"{FULLNAME}-api"))]
    with_s3 += [(g, t["spec"]["containers"][0]) for g, t in ray_pod_templates(name)]
    for who, c in with_s3:
        env = env_of(c)
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://minio.example:9000", who
        assert env["AWS_DEFAULT_REGION"]["value"] == "us-east-1", who
        assert _secret_ref(env["AWS_ACCESS_KEY_ID"]) == ("s3-keys", "AWS_ACCESS_KEY_ID"), who
        assert _secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("s3-keys", "AWS_SECRET_ACCESS_KEY"), who
        assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert not any(k.startswith("AWS_") for k in env_of(container(name, "Deployment", f"{FULLNAME}-dispatcher")))
    assert not any(k.startswith("AWS_") for k in env_of(container("default", "Deployment", f"{FULLNAME}-api")))


def test_shared_volumes_reach_the_api_and_ray_pods():
    name = "existing-secrets-static-ray"
    specs = [one(name, "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]]
    specs += [t["spec"] for _, t in ray_pod_templates(name)]
    for spec in specs:
        volume = {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}
        assert volume in spec["volumes"]
        mount = {"name": "datasets", "mountPath": "/usr/share/datasets", "readOnly": True}
        assert mount in spec["containers"][0]["volumeMounts"]


# --- Redis --------------------------------------------------------------------------------------


def test_in_chart_redis():
    sts = one("default", "StatefulSet", f"{FULLNAME}-redis")
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"] == "docker.io/library/redis:7"
    args = " ".join(redis["args"])
    assert "--appendonly yes --appendfsync always" in args and "--requirepass $(REDIS_PASSWORD)" in args
    assert "--maxmemory 768mb --maxmemory-policy noeviction" in args
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    service = one("default", "Service", f"{FULLNAME}-redis")
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == service["metadata"]["name"]
    env = env_of(container("default", "Deployment", f"{FULLNAME}-api"))
    assert _secret_ref(env["SCDD_REDIS_PASSWORD"]) == (f"{FULLNAME}-redis", "redis-password")
    assert env["REDIS_URL"]["value"] == f"redis://:$(SCDD_REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    names = [item["name"] for item in container("default", "Deployment", f"{FULLNAME}-api")["env"]]
    assert names.index("SCDD_REDIS_PASSWORD") < names.index("REDIS_URL")  # $(VAR) only sees earlier variables
    for _, template in ray_pod_templates("default"):  # KubeRay reads REDIS_PASSWORD on heads (GCS FT)
        assert "REDIS_PASSWORD" not in env_of(template["spec"]["containers"][0])
        # the Ray pods have REDIS_URL from the Secret, so the dispatcher keeps it out of the jobs' runtime_env
        assert env_of(template["spec"]["containers"][0])["REDIS_URL"] == env["REDIS_URL"]
    dispatcher = env_of(container("default", "Deployment", f"{FULLNAME}-dispatcher"))
    assert dispatcher["SCDD_JOBS_REDIS_URL"]["value"] == "cluster"
    no_auth = one("existing-secrets-static-ray", "StatefulSet", f"{FULLNAME}-redis")
    assert "volumeClaimTemplates" not in no_auth["spec"]
    assert {"name": "data", "emptyDir": {}} in no_auth["spec"]["template"]["spec"]["volumes"]
    assert "--requirepass" not in no_auth["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("name", ["external-redis", "external-redis-secret"])
def test_external_redis_renders_no_redis(name):
    assert not of_kind(name, "StatefulSet")
    named = {(d["kind"], d["metadata"]["name"]) for d in objects(name)}
    assert not {("Service", f"{FULLNAME}-redis"), ("Secret", f"{FULLNAME}-redis"),
                ("NetworkPolicy", f"{FULLNAME}-redis")} & named
    users = [container(name, "Deployment", f"{FULLNAME}-{d}") for d in ("api", "dispatcher")]
    users += [t["spec"]["containers"][0] for _, t in ray_pod_templates(name)]
    for c in users:
        env = env_of(c)
        assert "SCDD_REDIS_PASSWORD" not in env
        if name == "external-redis":
            assert env["REDIS_URL"] == {"name": "REDIS_URL", "value": "redis://redis.db.svc:6379/0"}
        else:
            assert _secret_ref(env["REDIS_URL"]) == ("redis-conn", "redis-url")


# --- API: Service, PDB, HPA, Ingress ---------------------------------------------------------------


def test_api_service_and_pdb():
    service = one("default", "Service", f"{FULLNAME}-api")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    pdb = one("default", "PodDisruptionBudget", f"{FULLNAME}-api")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert one("existing-secrets-static-ray", "PodDisruptionBudget", f"{FULLNAME}-api")["spec"] == {
        "maxUnavailable": "50%", "selector": pdb["spec"]["selector"]}
    api = container("default", "Deployment", f"{FULLNAME}-api")
    assert api["args"][:3] == ["uvicorn", "--factory", "service.api.main:create_app"] and "command" not in api
    dispatcher = container("default", "Deployment", f"{FULLNAME}-dispatcher")
    assert dispatcher["args"] == ["python", "-m", "service.dispatcher"]


@pytest.mark.parametrize("name", ["default", "hpa-off", "hpa-on"])
def test_hpa(name):
    deployment = one(name, "Deployment", f"{FULLNAME}-api")
    hpas = of_kind(name, "HorizontalPodAutoscaler")
    if name == "hpa-on":
        (hpa,) = hpas
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-api"}
        assert hpa["spec"]["scaleTargetRef"] == target
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu", "memory"]
        assert "replicas" not in deployment["spec"]  # the HPA owns it
    else:
        assert not hpas
        assert deployment["spec"]["replicas"] == (3 if name == "hpa-off" else 2)


def test_ingress():
    assert not of_kind("default", "Ingress")
    ingress = one("ingress", "Ingress", f"{FULLNAME}-api")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "scdd-tls", "hosts": ["scdd.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "scdd.example.com"
    assert rule["http"]["paths"][0]["backend"] == {"service": {"name": f"{FULLNAME}-api", "port": {"name": "http"}}}
    assert "export SCDD_SERVER=https://scdd.example.com" in _render("ingress")[1]


# --- NetworkPolicies, ServiceAccount, NOTES ---------------------------------------------------------


def _peers(policy: dict, direction: str = "ingress") -> list[tuple[dict, list]]:
    """(peer, ports) of every rule of the policy's ingress (`from`) or egress (`to`); {} is any peer."""
    side = "from" if direction == "ingress" else "to"
    return [(peer, rule.get("ports", [])) for rule in policy["spec"][direction] for peer in rule.get(side, [{}])]


def _component_labels(name: str) -> dict[str, dict]:
    """Pod labels of each Deployment / StatefulSet of value set `name`, by component (api, dispatcher, redis)."""
    return {where.split("/")[1].removeprefix(f"{FULLNAME}-"): t["metadata"]["labels"]
            for where, t in pod_templates(name) if where.startswith(("Deployment/", "StatefulSet/"))}


def test_network_policies():
    name = "default"
    labels = _component_labels(name)

    def selects(peer: dict, pod_labels: dict) -> bool:
        return "podSelector" in peer and peer["podSelector"]["matchLabels"].items() <= pod_labels.items()

    ray_pod = {"ray.io/cluster": CLUSTER, "ray.io/node-type": "worker"}  # KubeRay's labels on Ray pods
    redis = one(name, "NetworkPolicy", f"{FULLNAME}-redis")
    assert redis["spec"]["podSelector"]["matchLabels"].items() <= labels["redis"].items()
    for client in (labels["api"], labels["dispatcher"], ray_pod):
        assert any(selects(peer, client) and ports == [{"port": 6379, "protocol": "TCP"}]
                   for peer, ports in _peers(redis))
    head = one(name, "NetworkPolicy", f"{FULLNAME}-ray-head")
    assert head["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": CLUSTER, "ray.io/node-type": "head"}
    for client in (labels["api"], labels["dispatcher"]):
        assert any(selects(peer, client) and ports == [{"port": 8265, "protocol": "TCP"}]
                   for peer, ports in _peers(head))
    assert not any(selects(peer, labels["api"]) for peer, _ in _peers(one(name, "NetworkPolicy", f"{FULLNAME}-ray")))
    ray = one(name, "NetworkPolicy", f"{FULLNAME}-ray")
    assert ray["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": CLUSTER}
    assert any(selects(peer, ray_pod) and not ports for peer, ports in _peers(ray))  # all ports
    api = one(name, "NetworkPolicy", f"{FULLNAME}-api")
    assert api["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]  # from anywhere
    assert one(name, "NetworkPolicy", f"{FULLNAME}-dispatcher")["spec"]["ingress"] == []
    restricted = one("existing-secrets-static-ray", "NetworkPolicy", f"{FULLNAME}-api")["spec"]["ingress"][0]["from"]
    assert restricted[0] == {"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}
    test_pod = one("existing-secrets-static-ray", "Pod", f"{FULLNAME}-test-api")["metadata"]["labels"]
    assert any(selects(peer, test_pod) for peer in restricted)  # `helm test` still reaches the API
    assert not of_kind("no-gpu-group-no-policies", "NetworkPolicy")
    assert not of_kind("external-redis", "NetworkPolicy") or \
        f"{FULLNAME}-redis" not in {p["metadata"]["name"] for p in of_kind("external-redis", "NetworkPolicy")}


def _every_pod(name: str) -> list[tuple[str, dict, dict]]:
    """(where, labels the pod will carry, pod spec) of every pod template anywhere in the rendered objects (a
    Deployment's, a CronJob's job template's, a hook Pod, a RayCluster's groups, whatever kind holds one), found by
    shape, not by a list of kinds. Ray pods get the labels KubeRay puts on them (ray.io/cluster, node-type, group)."""
    found: list[tuple[str, dict, dict]] = []

    def walk(node, path: str, doc: dict) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]", doc)
            return
        if not isinstance(node, dict):
            return
        spec = node.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
            labels = dict((node.get("metadata") or {}).get("labels") or {})
            if doc["kind"] == "RayCluster":
                head = "headGroupSpec" in path
                group = "headgroup" if head else next(g["groupName"] for g in doc["spec"]["workerGroupSpecs"]
                                                      if g["template"] is node)
                labels.update({"ray.io/cluster": doc["metadata"]["name"], "ray.io/group": group,
                               "ray.io/node-type": "head" if head else "worker"})
            found.append((f"{doc['kind']}/{doc['metadata']['name']}{path}", labels, spec))
        for key, value in node.items():
            walk(value, f"{path}.{key}", doc)

    for doc in objects(name):
        walk(doc, "", doc)
    return found


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart's selectors use labels only
    return (selector.get("matchLabels") or {}).items() <= labels.items()


@pytest.mark.parametrize("name", VALUE_SETS)
def test_redis_admits_every_pod_that_talks_to_it(name):
    """Every pod whose environment holds REDIS_URL or Redis's password (its Secret) is admitted on 6379 by the
    NetworkPolicies that select the in-chart Redis (none selecting it: all ingress is open, as Kubernetes has it).
    The clients are found in the rendered manifests (the artifact GC's CronJob among them), not listed here."""
    pods = _every_pod(name)
    servers = [(where, labels, spec) for where, labels, spec in pods
               if any("redis-server" in (c.get("command") or []) + (c.get("args") or []) for c in spec["containers"])]
    if not servers:
        assert "external" in name, f"{name}: no in-chart Redis"
        return
    (server_where, server_labels, server_spec), = servers
    secrets = {item["valueFrom"]["secretKeyRef"]["name"] for c in server_spec["containers"] for item in c.get("env", [])
               if "secretKeyRef" in item.get("valueFrom", {})}

    def talks_to_redis(spec: dict) -> bool:
        for c in spec["containers"] + spec.get("initContainers", []):
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef", {})
                if item["name"] in ("REDIS_URL", "SCDD_REDIS_URL", "SCDD_REDIS_PASSWORD") or ref.get("name") in secrets:
                    return True
            if any(source.get("secretRef", {}).get("name") in secrets for source in c.get("envFrom", [])):
                return True
        return False

    clients = [(where, labels) for where, labels, spec in pods if where != server_where and talks_to_redis(spec)]
    assert any(where.startswith("CronJob/") for where, _ in clients) == VALUE_SETS[name].get("gc", {}).get(
        "enabled", True), clients  # the GC is found as a client exactly where it is enabled
    policies = [p for p in of_kind(name, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and _selects(p["spec"]["podSelector"], server_labels)]
    if not policies:
        assert VALUE_SETS[name].get("networkPolicy", {}).get("enabled") is False, name
        return
    for where, labels in clients:
        admitted = any(
            ("podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], labels)
             or peer == {}) and (not ports or any(port.get("port") in (6379, "redis") for port in ports))
            for policy in policies for peer, ports in _peers(policy))
        assert admitted, f"{name}: {where} (labels {labels}) talks to Redis but no NetworkPolicy admits it"


def test_egress_is_closed_but_for_what_each_pod_talks_to():
    name = "default"
    labels = _component_labels(name)
    policies = {p["metadata"]["name"].removeprefix(f"{FULLNAME}-"): p for p in of_kind(name, "NetworkPolicy")}
    dns = ({}, [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}])
    redis = ({"podSelector": {"matchLabels": {k: labels["redis"][k] for k in
                                              policies["redis"]["spec"]["podSelector"]["matchLabels"]}}},
             [{"port": 6379, "protocol": "TCP"}])
    jobs_api = ({"podSelector": {"matchLabels": {"ray.io/cluster": CLUSTER, "ray.io/node-type": "head"}}},
                [{"port": 8265, "protocol": "TCP"}])
    https = ({}, [{"port": 443, "protocol": "TCP"}])
    ray_pods = ({"podSelector": {"matchLabels": {"ray.io/cluster": CLUSTER}}}, [])
    expected = {"api": [dns, redis, jobs_api, https], "dispatcher": [dns, redis, jobs_api],
                "ray": [dns, redis, ray_pods, https], "redis": [], "gc": [dns, redis, https]}
    for component, rules in expected.items():
        policy = policies[component]
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"], component
        assert _peers(policy, "egress") == rules, component
    assert policies["ray-head"]["spec"]["policyTypes"] == ["Ingress"]  # its egress is the ray policy's
    external = {p["metadata"]["name"]: p for p in of_kind("external-redis", "NetworkPolicy")}
    assert _peers(external[f"{FULLNAME}-dispatcher"], "egress")[1] == ({}, [{"port": 6379, "protocol": "TCP"}])
    opened = of_kind("egress-open", "NetworkPolicy")
    assert opened and all(p["spec"]["policyTypes"] == ["Ingress"] and "egress" not in p["spec"] for p in opened)


def test_the_artifact_gc_runs_on_a_schedule_with_the_services_settings():
    (cron,) = of_kind("default", "CronJob")
    assert cron["spec"]["schedule"] == "17 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (gc,) = pod["spec"]["containers"]
    assert gc["args"] == ["python", "-m", "service.gc"]
    env = env_of(gc)
    assert env["SCDD_RETENTION_DAYS"]["value"] == "30" and "REDIS_URL" in env and "SCDD_ARTIFACTS" in env
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert gc["securityContext"]["readOnlyRootFilesystem"] is True
    policy = one("default", "NetworkPolicy", f"{FULLNAME}-gc")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not of_kind("no-gpu-group-no-policies", "CronJob")  # gc.enabled: false


def test_service_account_does_not_mount_its_token():
    account = one("default", "ServiceAccount", FULLNAME)
    assert account["automountServiceAccountToken"] is False
    for where, template in pod_templates("default"):
        if where.endswith("/head"):
            continue  # the autoscaler sidecar needs the ray-head account's token
        assert template["spec"]["serviceAccountName"] == FULLNAME, where
        assert template["spec"]["automountServiceAccountToken"] is False, where


def test_notes():
    notes = _render("default")[1]
    assert "KubeRay operator" in notes and "helm install kuberay-operator kuberay/kuberay-operator" in notes
    assert f"kubectl -n {NAMESPACE} port-forward service/{FULLNAME}-api 8000:8000" in notes
    assert (f"export SCDD_API_KEY=$(kubectl -n {NAMESPACE} get secret {FULLNAME}-api-keys "
            "-o jsonpath='{.data.api-key}' | base64 -d)") in notes
    assert "scdd-keys" in _render("existing-secrets-static-ray")[1]
    assert "Job bounds (a tenant's limits in the API key file win): 8 workers per job (SCDD_MAX_WORKERS),\n" \
           "8 GPUs held by running jobs at once (SCDD_MAX_GPUS), 2 jobs running at once;" in notes
    assert "CPU request 5, memory limit 32Gi." in _render("gpus-64")[1]
