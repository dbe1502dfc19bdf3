"""The Helm chart (helm/comind) and the Kubeflow TFJob example.

No Kubernetes API server can run on these machines, so the chart is checked
the way ENVIRONMENT.md says: `helm lint --strict`, `helm template` over the
values files in ci/, every rendered object validated against the Kubernetes
schemas (and the Prometheus Operator and cert-manager ones against their
CRDs' schemas), Helm's `lookup` answered by a fake API server, and what the
chart renders for the ps and two workers booted as containers of the
project's image, with the Services' DNS names, until they complete training.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from comind.aggregators import AGGREGATORS, AggregatorSettings
from comind.certificates import Authority
from comind.ps_main import round_policy
from comind.settings import load as load_settings
from compose_cluster import ROOT, build_image, docker_or_skip
from fake_kube_api import FakeKubeApi
from pod_runner import KubeApi, Pod, PodRunner, dns_names, expand, job_pods, statefulset_pods

CHART = ROOT / "helm" / "comind"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TFJOB = ROOT / "examples" / "kubeflow-tfjob.yaml"
RELEASE, NAMESPACE = "comind", "ml"
# The chart's kubeVersion floor, and a current release.
KUBE_VERSIONS = ("1.28.0", "1.33.0")
CUSTOM_RESOURCES = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate"}
# @kubernetes-models compiles each CRD's OpenAPI schema into a validator.
CRD_MODELS = ("@kubernetes-models/prometheus-operator@6.0.0", "@kubernetes-models/cert-manager@6.0.0")
ROUND = re.compile(r"Round (\d+)/(\d+): \d+ updates")


def tool_or_skip(name: str, installer: str) -> str:
    """A tool's path; without it, CI fails and a developer's run skips."""
    path = shutil.which(name)
    if not path:
        message = f"no {name} on the PATH; {installer} installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def helm() -> str:
    return tool_or_skip("helm", "./scripts/setup --for-tests (scripts/install-helm)")


def helm_run(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result


def render(helm: str, *args: str) -> list[dict]:
    """The objects that `helm template` renders (tests included), in order."""
    out = helm_run(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def values_args(values: Path | None) -> list[str]:
    return ["--values", str(values)] if values else []


def named(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def workloads(objects: list[dict]) -> dict[str, dict]:
    """The StatefulSets (lifecycle serve) or Jobs (train) by name."""
    return {**named(objects, "StatefulSet"), **named(objects, "Job")}


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    """Every pod spec the chart renders: the StatefulSets' or Jobs' templates and the test pod."""
    specs = {name: s["spec"]["template"]["spec"] for name, s in workloads(objects).items()}
    specs.update({name: p["spec"] for name, p in named(objects, "Pod").items()})
    return specs


def container(objects: list[dict], workload: str) -> dict:
    """The one container of a StatefulSet's or Job's pods."""
    [found] = workloads(objects)[workload]["spec"]["template"]["spec"]["containers"]
    return found


VALUES_FILES = [None, *CI_VALUES]
VALUES_IDS = ["defaults", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]


# Lint and schemas ----------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_lint_strict(helm, values):
    result = helm_run(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(values))
    assert "0 chart(s) failed" in result.stdout, result.stdout


@pytest.fixture(scope="module")
def crd_validator(tmp_path_factory):
    """Validates custom resources with the CRDs' schemas (npm packages, installed once per machine)."""
    node = tool_or_skip("node", "Debian's nodejs package")
    npm = tool_or_skip("npm", "Debian's npm package")
    modules = Path.home() / ".cache" / "comind" / "crd-models"
    if not (modules / "node_modules" / "@kubernetes-models" / "cert-manager").is_dir():
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(modules), *CRD_MODELS],
                       check=True, capture_output=True, timeout=300)

    def validate(resources: list[dict]) -> list[str | None]:
        result = subprocess.run([node, str(ROOT / "tests" / "crd_validate.mjs"), str(modules / "node_modules")],
                                input="".join(json.dumps(r) + "\n" for r in resources), capture_output=True,
                                text=True, timeout=60, check=True)
        return [json.loads(line).get("error") for line in result.stdout.splitlines()]

    return validate


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_every_rendered_object_validates_against_its_schema(helm, crd_validator, values):
    objects = render(helm, *values_args(values))
    custom = [o for o in objects if o["kind"] in CUSTOM_RESOURCES]
    for obj in objects:
        if obj["kind"] in CUSTOM_RESOURCES:
            continue
        for version in KUBE_VERSIONS:  # strict: no field Kubernetes does not know
            kubernetes_validate.validate(obj, version, strict=True)
    problems = {f"{o['kind']}/{o['metadata']['name']}": error
                for o, error in zip(custom, crd_validator(custom), strict=True) if error}
    assert problems == {}


def test_the_crd_validator_catches_a_bad_resource(crd_validator):
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
           "spec": {"selector": {}, "endpoints": [{"port": "metrics", "interval": "15 seconds"}]}}
    [error] = crd_validator([bad])
    assert error and "interval" in error


# Values and their schema ---------------------------------------------------------

_KEY = re.compile(r"^( *)([A-Za-z_][A-Za-z0-9_]*):")


def values_docs() -> dict[tuple[str, ...], str | None]:
    """Each key of values.yaml by path, with its `# --` comment (None for a key that only groups others).

    A documented key's value is one setting, whatever its shape (resources,
    a probe), so the keys inside it are not listed.
    """
    docs: dict[tuple[str, ...], str | None] = {}
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#") and comment is not None:
            comment.append(stripped.removeprefix("#").strip())
            continue
        if not stripped or stripped.startswith("#"):
            comment = None  # a blank line ends a comment; a plain one is no documentation
            continue
        match = _KEY.match(line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), key)
        stack.append((indent, key))
        if not any(docs.get(path[:i]) for i in range(1, len(path))):
            docs[path] = " ".join(comment) if comment else None
        comment = None
    return docs


def schema_docs(schema: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], str | None]:
    """Each property of the schema by path, with its description (None for one that only groups others)."""
    docs = {}
    for name, sub in schema.get("properties", {}).items():
        docs[(*prefix, name)] = None if "properties" in sub else sub.get("description")
        docs.update(schema_docs(sub, (*prefix, name)))
    return docs


def test_every_value_is_documented_and_the_schema_matches_values_yaml():
    docs = values_docs()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, doc in docs.items():
        value = values
        for key in path:
            value = value[key]
        assert doc or (isinstance(value, dict) and value), f"{'.'.join(path)} has no `# --` comment"
    schema = schema_docs(json.loads((CHART / "values.schema.json").read_text()))
    del schema[("global",)]  # Helm's own, shared with parent charts
    # The same keys, the same shape, and the same words.
    assert schema == docs


@pytest.mark.parametrize(("setting", "message"), [
    ("workers.replicas=-1", "/workers/replicas"),
    ("workers.replica=3", "additional properties 'replica' not allowed"),
    ("training.dataset=mnist", "/training/dataset"),
    ("tls.enabled=true", "tls.enabled needs a certificate for the ps"),
    ("tls.enabled=true,tls.certManager.enabled=true", "needs tls.certManager.issuerRef.name"),
    ("tls.enabled=true,tls.existingSecret=ps-tls", "tls.mutual needs the workers' client certificate"),
    ("ps.trimFraction=0.5", "/ps/trimFraction"),
    ("ps.aggregation=median", "ps.aggregation=median needs rounds of at least 3 updates"),
    ("ps.aggregation=trimmed-mean,workers.replicas=3", "trims nothing from rounds of 3 updates"),
    ("ps.serverOptimizer=adam", "/ps/serverOptimizer"),
    ("ps.serverMomentum=1", "/ps/serverMomentum"),
    ("ps.serverEpsilon=0", "/ps/serverEpsilon"),
    ("ps.updateEncoding=int4", "/ps/updateEncoding"),
    ("ps.secaggNeighbours=3", "/ps/secaggNeighbours"),
    ("ps.modelEncoding=int8", "/ps/modelEncoding"),
    ("training.proximalMu=-1", "/training/proximalMu"),
    ("ps.roundsMode=later", "/ps/roundsMode"),
    ("ps.roundsMode=async,ps.replicasToAggregate=2", "unset ps.replicasToAggregate"),
    ("ps.roundsMode=async,ps.clientsPerRound=2,ps.overSelection=0.5", "unset ps.overSelection"),
    # The buffer is half the 4 workers training at once: 2, too few for the median.
    ("ps.roundsMode=async,ps.aggregation=median,workers.replicas=10,ps.clientsPerRound=4", "Received: 2 updates"),
    ("ps.roundsMode=async,ps.dpNoiseMultiplier=1,ps.dpClip=1", "does not combine with worker-level differential"),
    ("ps.roundsMode=async,training.mode=distributed", "ps.roundsMode=async is for federated mode"),
    ("ps.roundsMode=async,ps.aggregation=median,workers.replicas=4", "median needs rounds of at least 3 updates"),
    ("ps.roundsMode=async,ps.federatedEvalEvery=2", "ps.federatedEvalEvery tests one global model"),
])
def test_bad_values_fail_with_a_message_that_names_them(helm, setting, message):
    result = helm_run(helm, "template", RELEASE, str(CHART), "--set", setting, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# What the chart renders -------------------------------------------------------------


@pytest.fixture(scope="module")
def everything(helm) -> list[dict]:
    """The chart with every optional part on."""
    return render(helm, *(arg for name in ("tls", "monitoring", "networkpolicy", "workers-8")
                          for arg in values_args(CHART / "ci" / f"{name}-values.yaml")),
                  "--set", "metrics.podMonitor.enabled=true")


def test_names_and_labels_follow_the_helm_conventions(everything):
    for obj in everything:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "comind" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["helm.sh/chart"] == "comind-0.1.0" and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert len(obj["metadata"]["name"]) <= 63


def test_every_selector_names_its_component_and_never_the_chart_version(everything):
    selectors = []
    for name, statefulset in named(everything, "StatefulSet").items():
        selector = statefulset["spec"]["selector"]["matchLabels"]
        assert selector.items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
        selectors.append((name, selector))
    selectors += [(n, s["spec"]["selector"]) for n, s in named(everything, "Service").items()]
    selectors += [(n, b["spec"]["selector"]["matchLabels"])
                  for n, b in named(everything, "PodDisruptionBudget").items()]
    selectors += [(n, p["spec"]["podSelector"]["matchLabels"]) for n, p in named(everything, "NetworkPolicy").items()]
    for name, selector in selectors:
        assert selector["app.kubernetes.io/component"] in ("ps", "worker"), name
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & selector.keys(), name
    ps_service = named(everything, "Service")["comind-ps"]
    assert ps_service["spec"]["selector"]["app.kubernetes.io/component"] == "ps"


@pytest.mark.parametrize("workers", [2, 8, 64])
def test_one_value_scales_the_workers_and_the_quorum_follows(helm, workers):
    objects = render(helm, *values_args(CHART / "ci" / f"workers-{workers}-values.yaml"))
    settings = named(objects, "ConfigMap")["comind"]["data"]
    assert settings["COMIND_NUM_WORKERS"] == str(workers)
    assert settings["COMIND_PS_ADDRESS"] == "comind-ps:2222"
    # Unless backup workers are asked for, a round waits for every live worker, however many there are.
    ps = container(objects, "comind-ps")
    assert env_of(ps).get("COMIND_REPLICAS_TO_AGGREGATE", {}).get("value") == ("60" if workers == 64 else None)
    pdb = named(objects, "PodDisruptionBudget")["comind-worker"]["spec"]
    if workers == 8:  # lifecycle serve (its workers have data claims): StatefulSets
        statefulsets = named(objects, "StatefulSet")
        assert statefulsets["comind-ps"]["spec"]["replicas"] == 1
        assert statefulsets["comind-worker"]["spec"]["replicas"] == workers
        assert env_of(container(objects, "comind-worker"))["COMIND_TASK_INDEX"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        assert pdb == {"maxUnavailable": 1, "selector": pdb["selector"]}
        assert settings["COMIND_AFTER_TRAINING"] == "serve"
        return
    # lifecycle train: the ps's Job, the chief's (task 0), and an Indexed Job of the others (index i: task i + 1).
    jobs = named(objects, "Job")
    assert set(jobs) == {"comind-ps", "comind-chief", "comind-worker"} and not named(objects, "StatefulSet")
    assert "completions" not in jobs["comind-ps"]["spec"] and "completions" not in jobs["comind-chief"]["spec"]
    workers_job = jobs["comind-worker"]["spec"]
    assert (workers_job["completionMode"], workers_job["completions"], workers_job["parallelism"]) == \
        ("Indexed", workers - 1, workers - 1)
    assert env_of(container(objects, "comind-chief"))["COMIND_TASK_INDEX"]["value"] == "0"
    worker = container(objects, "comind-worker")
    assert "COMIND_TASK_INDEX" not in env_of(worker)
    # The shell the command runs turns index 2 into task 3.
    [shell, flag, script] = [expand(part, {"JOB_COMPLETION_INDEX": "2"}) for part in worker["command"]]
    task = subprocess.run([shell, flag, script.replace("exec comind run", 'echo "$COMIND_TASK_INDEX"')],
                          env={"JOB_COMPLETION_INDEX": "2"}, capture_output=True, text=True, check=True).stdout
    assert task == "3\n"
    # A Job has no scale subresource: the budget is an integer minAvailable (10% of 64 rounds up to 7).
    assert pdb == {"minAvailable": workers - (7 if workers == 64 else 1), "selector": pdb["selector"]}
    assert settings["COMIND_AFTER_TRAINING"] == "exit"


def test_a_job_fails_at_once_on_a_bad_setting_and_an_eviction_costs_no_retry(helm):
    for job in named(render(helm), "Job").values():
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["backoffLimit"] == 6
        [container_name] = [c["name"] for c in spec["template"]["spec"]["containers"]]
        assert spec["podFailurePolicy"]["rules"] == [
            {"action": "FailJob", "onExitCodes": {"containerName": container_name, "operator": "In", "values": [2]},
             "onPodConditions": []},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    # One worker: the chief's Job alone.
    assert set(named(render(helm, "--set", "workers.replicas=1"), "Job")) == {"comind-ps", "comind-chief"}


def test_the_mode_the_server_optimizer_and_fedprox_reach_the_ps_and_the_workers_as_their_settings(helm):
    objects = render(helm, "--set", "ps.serverOptimizer=fedadam,ps.serverLearningRate=0.01,ps.serverBeta1=0,"
                     "ps.serverBeta2=0.999,training.proximalMu=0.05,training.mode=distributed")
    ps, worker = container(objects, "comind-ps"), container(objects, "comind-worker")
    variables = {name: entry["value"] for name, entry in env_of(ps).items() if "value" in entry}
    shared = named(objects, "ConfigMap")["comind"]["data"]
    loaded = load_settings("ps", {}, {**shared, **variables})
    assert (loaded.mode, loaded.server_optimizer, loaded.server_learning_rate, loaded.server_momentum,
            loaded.server_beta1, loaded.server_beta2, loaded.server_epsilon) == \
        ("distributed", "fedadam", 0.01, None, 0.0, 0.999, None)
    proximal_mu = env_of(worker)["COMIND_PROXIMAL_MU"]["value"]
    assert load_settings("worker", {}, {**shared, "COMIND_PROXIMAL_MU": proximal_mu}).proximal_mu == 0.05
    # The defaults leave every choice to the ps, by its mode.
    ps = container(render(helm), "comind-ps")
    assert not {name for name in env_of(ps) if name.startswith("COMIND_SERVER_")}


def ps_settings(objects: list[dict]):
    """The settings the rendered ps would load: its ConfigMap and its container's variables."""
    variables = {name: entry["value"] for name, entry in env_of(container(objects, "comind-ps")).items()
                 if "value" in entry}
    return load_settings("ps", {}, {**named(objects, "ConfigMap")["comind"]["data"], **variables})


def test_asynchronous_rounds_reach_the_ps_as_its_settings(helm):
    loaded = ps_settings(render(helm, "--set", "ps.roundsMode=async,ps.bufferSize=3,ps.stalenessExponent=0.25,"
                                "ps.maxStaleness=4,ps.aggregation=median"))
    assert (loaded.rounds_mode, loaded.buffer_size, loaded.staleness_exponent, loaded.max_staleness) == \
        ("async", 3, 0.25, 4)
    # Client sampling: 6 of 8 train at once, and the buffer is half of them, 3, enough for the median, as the ps
    # finds too.
    loaded = ps_settings(render(helm, "--set", "ps.roundsMode=async,ps.clientsPerRound=6,workers.replicas=8,"
                                "ps.aggregation=median"))
    assert (loaded.clients_per_round, round_policy(loaded).expected_updates) == (6, 3)
    # Synchronous by default, and the async settings are left to the ps's defaults.
    ps = container(render(helm), "comind-ps")
    assert env_of(ps)["COMIND_ROUNDS_MODE"]["value"] == "sync"
    assert not {"COMIND_BUFFER_SIZE", "COMIND_STALENESS_EXPONENT", "COMIND_MAX_STALENESS"} & set(env_of(ps))


def test_example_level_dp_sgd_reaches_the_workers_as_their_settings(helm):
    objects = render(helm, "--set", "training.dpExampleNoiseMultiplier=1.1,training.dpExampleClip=0.5,"
                     "training.dpExampleDelta=1e-6")
    worker = container(objects, "comind-worker")
    variables = {name: entry["value"] for name, entry in env_of(worker).items() if "value" in entry}
    loaded = load_settings("worker", {}, {**named(objects, "ConfigMap")["comind"]["data"], **variables})
    assert (loaded.dp_example_noise_multiplier, loaded.dp_example_clip, loaded.dp_delta) == (1.1, 0.5, 1e-6)
    # Off by default.
    worker = container(render(helm), "comind-worker")
    assert not {name for name in env_of(worker) if name.startswith("COMIND_DP_")}


def test_federated_evaluation_reaches_the_ps_and_the_workers_as_their_settings(helm):
    objects = render(helm, "--set", "ps.federatedEvalEvery=3,training.evalFraction=0.2")
    config = named(objects, "ConfigMap")["comind"]["data"]
    settings = {}
    for role, workload in (("ps", "comind-ps"), ("worker", "comind-chief"), ("worker", "comind-worker")):
        variables = {name: entry["value"] for name, entry in env_of(container(objects, workload)).items()
                     if "value" in entry}
        settings[workload] = load_settings(role, {}, {**config, **variables})
    assert settings["comind-ps"].federated_eval_every == 3
    assert settings["comind-chief"].eval_fraction == settings["comind-worker"].eval_fraction == 0.2
    # Off by default.
    assert "COMIND_FEDERATED_EVAL_EVERY" not in env_of(container(render(helm), "comind-ps"))


def test_secure_aggregation_reaches_the_ps_as_its_settings(helm):
    objects = render(helm, "--set", "ps.secureAggregation=true,ps.secaggThreshold=0.75,ps.secaggNeighbours=6,"
                     "ps.secaggClipRange=2,ps.maxUpdateNorm=1.5")
    ps = container(objects, "comind-ps")
    variables = {name: entry["value"] for name, entry in env_of(ps).items() if "value" in entry}
    loaded = load_settings("ps", {}, {**named(objects, "ConfigMap")["comind"]["data"], **variables})
    assert (loaded.secure_aggregation, loaded.secagg_threshold, loaded.secagg_neighbours, loaded.secagg_clip_range,
            loaded.max_update_norm) == (True, 0.75, 6, 2.0, 1.5)
    # Off by default.
    ps = container(render(helm), "comind-ps")
    assert not {name for name in env_of(ps) if name.startswith(("COMIND_SECURE_", "COMIND_SECAGG_"))}


def test_the_ps_keeps_checkpoints_on_a_claim_and_workers_may_have_data_volumes(everything, helm):
    statefulsets = named(everything, "StatefulSet")
    [checkpoints] = statefulsets["comind-ps"]["spec"]["volumeClaimTemplates"]
    assert checkpoints["metadata"]["name"] == "checkpoints"
    [ps] = statefulsets["comind-ps"]["spec"]["template"]["spec"]["containers"]
    assert env_of(ps)["COMIND_CHECKPOINT_DIR"]["value"] == "/checkpoints"
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in ps["volumeMounts"]
    [data] = statefulsets["comind-worker"]["spec"]["volumeClaimTemplates"]
    [worker] = statefulsets["comind-worker"]["spec"]["template"]["spec"]["containers"]
    assert data["metadata"]["name"] == "data" and env_of(worker)["COMIND_DATA_DIR"]["value"] == "/data"
    # lifecycle train: the Jobs' claims are the chart's own; the outputs' outlives the release.
    objects = render(helm)
    claims = named(objects, "PersistentVolumeClaim")
    assert set(claims) == {"comind-ps-checkpoints", "comind-output"}
    assert claims["comind-output"]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert "annotations" not in claims["comind-ps-checkpoints"]["metadata"]
    volumes = {name: {v["name"]: v for v in spec["volumes"]} for name, spec in pod_specs(objects).items()}
    assert volumes["comind-ps"]["checkpoints"]["persistentVolumeClaim"] == {"claimName": "comind-ps-checkpoints"}
    assert volumes["comind-chief"]["output"]["persistentVolumeClaim"] == {"claimName": "comind-output"}
    assert "emptyDir" in volumes["comind-worker"]["output"]
    # Per-worker data claims are a StatefulSet's.
    result = helm_run(helm, "template", RELEASE, str(CHART), "--set", "workers.persistence.enabled=true", check=False)
    assert result.returncode != 0 and "set lifecycle=serve" in result.stderr


def output_reader(helm: str, *args: str) -> tuple[str, str, dict]:
    """The pod that NOTES' `kubectl run --overrides` starts to copy the outputs: its name, image and spec."""
    notes = helm_run(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                     *args).stdout.split("NOTES:", 1)[1]
    run = re.search(r"kubectl --namespace \S+ run (\S+) --restart=Never --image=(\S+) --overrides='(.+)'", notes)
    assert f"kubectl --namespace {NAMESPACE} cp {run[1]}:/output ./comind-output" in notes
    return run[1], run[2], json.loads(run[3])["spec"]


def test_every_pod_runs_under_the_restricted_security_profile(everything, helm):
    train = {f"{name} (lifecycle train)": spec for name, spec in pod_specs(render(helm)).items()}
    for name, spec in {**pod_specs(everything), **train}.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name
            [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], name
        # Only the test pod talks to the Kubernetes API.
        assert spec["automountServiceAccountToken"] is name.startswith("comind-test"), name
    # The pod that copies the outputs out reads them alone.
    _, _, reader = output_reader(helm)
    assert reader["securityContext"] == yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    [container] = reader["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and not reader["automountServiceAccountToken"]
    assert container["volumeMounts"] == [{"name": "output", "mountPath": "/output", "readOnly": True}]


def test_network_policy_lets_workers_reach_only_the_ps_and_the_ps_only_its_ports(everything):
    policies = named(everything, "NetworkPolicy")
    ps, worker = policies["comind-ps"]["spec"], policies["comind-worker"]["spec"]
    assert ps["policyTypes"] == worker["policyTypes"] == ["Ingress", "Egress"]
    assert ps["egress"] == []
    assert [[p["port"] for p in rule["ports"]] for rule in ps["ingress"]] == [["grpc"], ["metrics"]]
    from_components = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                       for peer in ps["ingress"][0]["from"]]
    assert from_components == ["worker", "test"]
    to_ps, dns, *extra = worker["egress"]
    assert to_ps["ports"] == [{"port": "grpc"}]
    assert to_ps["to"] == [{"podSelector": {"matchLabels": ps["podSelector"]["matchLabels"]}}]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert extra == [{"ports": [{"port": 443, "protocol": "TCP"}]}]  # from ci/networkpolicy-values.yaml
    assert [[p["port"] for p in rule["ports"]] for rule in worker["ingress"]] == [["metrics"]]


def test_the_ps_certificate_names_every_address_of_the_ps_and_workers_see_only_the_ca(everything):
    certificates = named(everything, "Certificate")
    ps_names = certificates["comind-ps"]["spec"]["dnsNames"]
    assert "comind-ps" in ps_names  # the host of COMIND_PS_ADDRESS
    for host in ("comind-ps", "comind-ps-0.comind-ps-headless"):
        assert set(dns_names(host, NAMESPACE)) <= set(ps_names)
    assert "client auth" in certificates["comind-worker"]["spec"]["usages"]
    worker_spec = named(everything, "StatefulSet")["comind-worker"]["spec"]["template"]["spec"]
    [tls] = [v for v in worker_spec["volumes"] if v["name"] == "tls"]
    projected = {s["secret"]["name"]: [i["key"] for i in s["secret"]["items"]] for s in tls["projected"]["sources"]}
    assert projected == {"comind-ps-tls": ["ca.crt"], "comind-worker-tls": ["tls.crt", "tls.key"]}
    [worker] = worker_spec["containers"]
    assert {"COMIND_TLS_CA", "COMIND_TLS_CERT", "COMIND_TLS_KEY"} <= env_of(worker).keys()


def test_existing_secrets_replace_the_generated_token_and_cert_manager(helm):
    objects = render(helm, *values_args(CHART / "ci" / "tls-existing-secret-values.yaml"))
    assert not named(objects, "Secret") and not named(objects, "Certificate")
    spec = workloads(objects)["comind-ps"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "my-comind-token"
    assert volumes["tls"]["projected"]["sources"] == [{"secret": {"name": "my-comind-ps-tls"}}]
    # Without mutual TLS the ps asks for no client certificate.
    [ps] = spec["containers"]
    assert "COMIND_TLS_CA" not in env_of(ps) and "COMIND_TLS_CERT" in env_of(ps)


def test_monitoring_scrapes_each_process_once(everything, helm):
    [monitor] = named(everything, "ServiceMonitor").values()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    services = [s for s in named(everything, "Service").values()
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    scraped = sorted(s["metadata"]["name"] for s in services if "metrics" in [p["name"] for p in s["spec"]["ports"]])
    assert scraped == ["comind-ps", "comind-worker"]  # not the ps's headless Service too
    dashboard = named(everything, "ConfigMap")["comind-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["comind.json"])["uid"] == "comind"
    # By default, pods carry Prometheus's discovery annotations.
    spec = workloads(render(helm))["comind-worker"]["spec"]["template"]["metadata"]["annotations"]
    assert spec["prometheus.io/scrape"] == "true" and spec["prometheus.io/port"] == "8000"


def test_the_dashboard_in_the_chart_is_the_one_compose_provisions():
    shipped = ROOT / "monitoring" / "grafana" / "dashboards" / "comind.json"
    copy = CHART / "files" / "dashboards" / "comind.json"
    assert copy.read_bytes() == shipped.read_bytes(), f"the chart's copy is stale: cp {shipped} {copy}"


def test_the_helm_test_pod_may_read_only_the_worker_statefulset(everything):
    [role] = named(everything, "Role").values()
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["statefulsets"],
                              "resourceNames": ["comind-worker"], "verbs": ["get"]}]
    pod = named(everything, "Pod")["comind-test"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "comind.deployment_check"]
    assert container["args"] == ["--ps-address=comind-ps:2222", "--metrics-url=http://comind-ps:8000/metrics",
                                 f"--namespace={NAMESPACE}", "--statefulset=comind-worker"]


def test_notes_give_the_exact_port_forward_wait_and_copy_commands(helm):
    result = helm_run(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                      "--set", "auth.enabled=false")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl --namespace {NAMESPACE} port-forward service/comind-ps 8000:8000" in notes
    assert f"helm test {RELEASE} --namespace {NAMESPACE}" in notes
    assert "WARNING: authentication is off" in notes
    assert f"kubectl --namespace {NAMESPACE} wait --for=condition=complete --timeout=24h job " \
           f"-l app.kubernetes.io/instance={RELEASE}" in notes
    serve = helm_run(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                     "--set", "lifecycle=serve").stdout.split("NOTES:", 1)[1]
    assert f"kubectl --namespace {NAMESPACE} cp comind-worker-0:/output ./comind-output" in serve
    assert "condition=complete" not in serve


# The token across upgrades -----------------------------------------------------------


def token_of(objects: list[dict]) -> str:
    return base64.b64decode(named(objects, "Secret")["comind-token"]["data"]["token"]).decode()


def test_the_generated_token_is_kept_across_upgrades(helm, tmp_path):
    installed = named(render(helm), "Secret")["comind-token"]
    assert len(token_of([installed])) == 48 and token_of(render(helm)) != token_of([installed])
    assert installed["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The Secret as the install left it in the cluster, with Helm's ownership marks.
    installed["metadata"]["namespace"] = NAMESPACE
    installed["metadata"]["annotations"].update({"meta.helm.sh/release-name": RELEASE,
                                                 "meta.helm.sh/release-namespace": NAMESPACE})
    with FakeKubeApi([installed]) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
        result = helm_run(helm, "upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                          "--kubeconfig", str(kubeconfig), "--dry-run=server", "--disable-openapi-validation",
                          "--set", "workers.replicas=8")
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/comind-token" in api.requests  # the lookup
    manifest = result.stdout.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0]
    upgraded = [o for o in yaml.safe_load_all(manifest) if o]
    assert named(upgraded, "Job")["comind-worker"]["spec"]["parallelism"] == 7
    assert token_of(upgraded) == token_of([installed])


# Booting what the chart renders ----------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    docker_or_skip()
    build_image()
    return "comind:latest"


@pytest.fixture
def pods(image, tmp_path):
    """Makes PodRunners; removes every container, volume and network they made, whatever happens."""
    import docker

    client = docker.from_env()
    made = []

    def make(objects: list[dict], image: str | None = None, secrets=None, kube_api=None) -> PodRunner:
        made.append(PodRunner(client, image, objects, NAMESPACE, tmp_path / f"pods-{len(made)}", secrets, kube_api))
        return made[-1]

    yield make
    for runner in made:
        runner.close()
        assert runner.leftovers() == []


def rounds_closed(log: str) -> list[int]:
    return [int(r) for r, _ in ROUND.findall(log)]


def boot_and_train(runner: PodRunner, ps: Pod, workers: list[Pod], rounds: int, serve: bool = False) -> None:
    """Starts the ps, then the workers, checks every probe, and waits until training is done: every process
    exited 0 (a Job's pods, the TFJob's), or, with ``serve``, every one still up after the last round."""
    for pod in (ps, *workers):
        runner.start(pod)
        if pod is ps:  # as the chart's readiness gates would have it; the workers retry anyway
            runner.wait_until_ready(ps.name, timeout=60)
    for pod in (ps, *workers):
        runner.wait_until_ready(pod.name, timeout=120)
        for probe in ("startupProbe", "livenessProbe"):
            if probe in pod.container:
                assert runner.probe(pod.name, pod.container[probe]), (pod.name, probe)
    if serve:
        for worker in workers:
            runner.wait_for_log(worker.name, r"this worker stays up until stopped", timeout=300)
        # Nothing exited, so a StatefulSet restarts nothing.
        assert [runner.container(p.name).status for p in (ps, *workers)] == ["running"] * (1 + len(workers))
    else:
        for worker in workers:
            assert runner.wait_for_exit(worker.name, timeout=300) == 0, runner.logs(worker.name)[-3000:]
        assert runner.wait_for_exit(ps.name, timeout=60) == 0, runner.logs(ps.name)[-3000:]
    log = runner.logs(ps.name)
    assert rounds_closed(log) == list(range(1, rounds + 1)), log[-3000:]
    assert f"Worker 1 joined ({workers[1].host})" in log
    assert "Final test accuracy" in runner.logs(workers[0].name)


def chart_cluster(helm: str, *args: str) -> tuple[list[dict], Pod, list[Pod]]:
    """What the chart renders, and the pods its controllers make: the ps, then the workers, the chief first."""
    objects = render(helm, "--set", "image.tag=latest", "--set", "training.rounds=5",
                     "--set", "training.intervalSteps=20", *args)
    statefulsets, jobs = named(objects, "StatefulSet"), named(objects, "Job")
    if statefulsets:
        [ps] = statefulset_pods(statefulsets["comind-ps"])
        return objects, ps, statefulset_pods(statefulsets["comind-worker"])
    [ps] = job_pods(jobs["comind-ps"])
    return objects, ps, [*job_pods(jobs["comind-chief"]), *job_pods(jobs["comind-worker"])]


def copy_out(runner: PodRunner, pod_name: str, folder: str, to: Path) -> list[str]:
    """What `kubectl cp POD:FOLDER TO` does (tar in the container, through exec); returns the files copied."""
    code, archive = runner.container(pod_name).exec_run(["tar", "cf", "-", "-C", folder, "."])
    assert code == 0, archive[-2000:]
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(to, filter="data")
    return sorted(str(f.relative_to(to)) for f in to.rglob("*") if f.is_file())


class CertManager:
    """Issues what cert-manager would for the chart's Certificates, from one CA."""

    def __init__(self):
        self.authority = Authority("comind test CA")

    def issue(self, certificate: dict) -> dict[str, bytes]:
        """The Secret data of a Certificate: tls.crt, tls.key, ca.crt."""
        spec = certificate["spec"]
        issued = self.authority.issue(spec["commonName"], server="server auth" in spec["usages"],
                                      client="client auth" in spec["usages"], hosts=spec.get("dnsNames", ()))
        return {"tls.crt": issued.cert, "tls.key": issued.key, "ca.crt": self.authority.pem}


def test_what_the_chart_renders_trains_to_completion_through_a_ps_crash_and_keeps_the_outputs(helm, pods, tmp_path):
    """lifecycle train: every Job's pod ends with exit 0; a crashed ps's replacement resumes from the claim;
    the chief's outputs are on theirs, and NOTES' copy command reads them back."""
    # The ps's round timeout stays its default, 600 s: a round the crash interrupted must close with every update,
    # not at its deadline, for the workers to exit in time.
    objects, ps, workers = chart_cluster(helm, "--set", "training.rounds=30")
    assert [w.name.rsplit("-", 1)[0] for w in workers] == ["comind-chief", "comind-worker-0"]
    runner = pods(objects)
    # Workers dial the ps by its Service's name, and the ps's pod has the headless Service's names too.
    assert runner.aliases(ps)[:1] == ["comind-ps"] and "comind-ps-0.comind-ps-headless" in runner.aliases(ps)
    assert "comind-worker-0.comind-worker" in runner.aliases(workers[1])
    for pod in (ps, *workers):
        runner.start(pod)
    runner.wait_for_log(ps.name, r"Round 3/30")
    # A crash (here SIGKILL; an out-of-memory kill alike) is no exit 2 and no disruption: the Job counts it and
    # makes a new pod, which resumes from the checkpoint claim while the workers wait for it; a worker whose update
    # the killed ps had taken sends it again once it has joined the new one.
    runner.container(ps.name).kill()
    assert runner.wait_for_exit(ps.name, timeout=30) == 137
    [replacement] = job_pods(named(objects, "Job")["comind-ps"])
    runner.start(replacement)
    for worker in workers:
        assert runner.wait_for_exit(worker.name, timeout=300) == 0, runner.logs(worker.name)[-3000:]
    assert runner.wait_for_exit(replacement.name, timeout=60) == 0, runner.logs(replacement.name)[-3000:]
    resumed = re.search(r"Resumed from \S+ at round (\d+)\.", runner.logs(replacement.name))
    assert resumed and rounds_closed(runner.logs(replacement.name)) == list(range(int(resumed[1]) + 1, 31))
    assert "Final test accuracy" in runner.logs(workers[0].name)

    # NOTES' commands: a pod that mounts the claim, and `kubectl cp` from it.
    name, image, spec = output_reader(helm, "--set", "image.tag=latest")
    reader = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(reader, version, strict=True)
    [spec_container] = spec["containers"]
    assert spec_container["image"] == image == "comind:latest"
    runner.start(Pod(name, {"run": name}, spec))
    runner.wait_until_ready(name, timeout=30)
    copied = copy_out(runner, name, "/output", tmp_path / "comind-output")
    assert {"model.keras", "metrics.json", "history.png", "predictions.png"} <= set(copied)
    assert [f for f in copied if f.startswith("tensorboard/")]
    assert len(json.loads((tmp_path / "comind-output" / "metrics.json").read_text())["rounds"]) > 0


def test_kubectl_scale_adds_a_worker_that_the_next_rounds_wait_for(helm, pods):
    # Synchronous steps and many rounds: training outlasts the test.
    objects, ps, workers = chart_cluster(helm, "--set", "training.rounds=100000", "--set", "training.intervalSteps=1")
    runner = pods(objects)
    for pod in (ps, *workers):
        runner.start(pod)
    runner.wait_for_log(ps.name, r"Round \d+/\d+: 2 updates")
    # What `kubectl patch job comind-worker` to parallelism and completions 2 makes (an elastic Indexed Job):
    # the same template, index 1, task 2.
    [added] = job_pods(named(objects, "Job")["comind-worker"], indexes=[1])
    assert runner.env(added)["COMIND_NUM_WORKERS"] == "2" and runner.env(added)["JOB_COMPLETION_INDEX"] == "1"
    runner.start(added)
    runner.wait_for_log(ps.name, r"Worker 2 joined \(comind-worker-1\); 3 live")
    runner.wait_for_log(ps.name, r"Round \d+/\d+: 3 updates")
    assert "sharding the data as if there were 3 workers" in runner.logs(added.name)


def test_the_helm_test_pod_passes_against_a_training_cluster(helm, pods, image):
    import docker

    try:
        docker.from_env().containers.run(image, entrypoint=["python", "-c", "import kubernetes"], remove=True)
    except docker.errors.ContainerError:
        pytest.skip(f"{image} has no kubernetes package for the helm test pod (comind.deployment_check) yet")
    # Synchronous steps and many rounds: training outlasts the check.
    objects, ps, workers = chart_cluster(helm, "--set", "training.rounds=100000", "--set", "training.intervalSteps=1")
    issuer = CertManager()
    api_tls = issuer.issue({"spec": {"commonName": "kubernetes", "dnsNames": ["kubernetes"],
                                     "usages": ["server auth"]}})
    runner = pods(objects, kube_api=KubeApi("kubernetes", 6443, {
        "token": b"a token the fake API accepts", "ca.crt": api_tls["ca.crt"], "namespace": NAMESPACE.encode()}))
    for pod in (ps, *workers):
        runner.start(pod)
    for pod in (ps, *workers):
        runner.wait_until_ready(pod.name, timeout=120)

    # The API server, with the workers' Jobs as their controller reports them now.
    jobs = [{**job, "metadata": {**job["metadata"], "namespace": NAMESPACE},
             "status": {"active": 1, "ready": 1}} for name, job in named(objects, "Job").items() if name != "comind-ps"]
    runner.secrets["fake-kube-api"] = {**api_tls, "objects.json": json.dumps(jobs).encode(),
                                       "fake_kube_api.py": (ROOT / "tests" / "fake_kube_api.py").read_bytes()}
    runner.services.append({"kind": "Service", "metadata": {"name": "kubernetes"},
                            "spec": {"selector": {"component": "kube-apiserver"}}})
    api = Pod("kube-apiserver", {"component": "kube-apiserver"}, {
        "automountServiceAccountToken": False, "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
        "volumes": [{"name": "api", "secret": {"secretName": "fake-kube-api"}}],
        "containers": [{"name": "api", "image": image, "ports": [{"name": "https", "containerPort": 6443}],
                        "command": ["python", "/api/fake_kube_api.py", "--port", "6443", "--cert", "/api/tls.crt",
                                    "--key", "/api/tls.key", "/api/objects.json"],
                        "readinessProbe": {"tcpSocket": {"port": "https"}},
                        "volumeMounts": [{"name": "api", "mountPath": "/api"}]}]})
    runner.start(api)
    runner.wait_until_ready(api.name, timeout=30)

    [test] = named(objects, "Pod").values()
    check = Pod(test["metadata"]["name"], test["metadata"]["labels"], test["spec"])
    runner.start(check)
    assert runner.wait_for_exit(check.name, timeout=150) == 0, runner.logs(check.name)
    assert runner.logs(check.name).startswith(
        f"ok: the ps at comind-ps:2222 counts 2 live workers, and 2 of the 2 pods of Jobs {NAMESPACE}/comind-chief, "
        f"{NAMESPACE}/comind-worker are ready")


def test_what_the_chart_renders_to_serve_with_mutual_tls_trains_and_stays_up(helm, pods, tmp_path):
    """lifecycle serve: StatefulSets whose processes stay up after the last round; the chief's outputs are
    copied from its running pod, and a stop is a clean exit. With secure aggregation on, as the chart passes it."""
    objects, ps, workers = chart_cluster(helm, *values_args(CHART / "ci" / "tls-values.yaml"),
                                         "--set", "lifecycle=serve", "--set", "ps.secureAggregation=true")
    issuer = CertManager()
    secrets = {c["spec"]["secretName"]: issuer.issue(c) for c in named(objects, "Certificate").values()}
    runner = pods(objects, secrets=secrets)
    assert {"COMIND_TLS_CA", "COMIND_TLS_CERT", "COMIND_TLS_KEY"} <= runner.env(workers[0]).keys()
    assert runner.env(workers[1])["COMIND_TASK_INDEX"] == "1"
    boot_and_train(runner, ps, workers, rounds=5, serve=True)
    assert "(TLS)" in runner.logs(ps.name)
    unmasked = re.findall(r"Round (\d+)'s sum of 2 masked inputs unmasked", runner.logs(ps.name))
    assert unmasked == ["1", "2", "3", "4", "5"]
    url = f"http://127.0.0.1:{runner.host_port(ps.name, 'metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert re.search(r"^comind_training_done 1\.0$", response.read().decode(), re.MULTILINE)
    # NOTES' `kubectl cp comind-worker-0:/output ./comind-output`.
    assert "metrics.json" in copy_out(runner, workers[0].name, "/output", tmp_path / "comind-output")
    for pod in (*workers, ps):  # what deleting the pods does: SIGTERM
        runner.container(pod.name).stop(timeout=30)
    assert runner.wait_for_exit(ps.name, timeout=30) == 0


def tfjob_pods(job: dict) -> tuple[list[Pod], list[dict]]:
    """The pods and Services the Kubeflow training operator makes for a TFJob, with its TF_CONFIG.

    Replica i of type T is the pod JOB-t-i behind a headless Service of the
    same name; TF_CONFIG lists every replica as JOB-t-i.NAMESPACE.svc:PORT.
    """
    name, specs = job["metadata"]["name"], job["spec"]["tfReplicaSpecs"]

    def port(spec: dict) -> int:
        [container] = [c for c in spec["template"]["spec"]["containers"] if c["name"] == "tensorflow"]
        return next((p["containerPort"] for p in container.get("ports", []) if p["name"] == "tfjob-port"), 2222)

    cluster = {kind.lower(): [f"{name}-{kind.lower()}-{i}.{NAMESPACE}.svc:{port(spec)}"
                              for i in range(spec["replicas"])] for kind, spec in specs.items()}
    pods, services = [], []
    for kind, spec in specs.items():
        for i in range(spec["replicas"]):
            pod_name = f"{name}-{kind.lower()}-{i}"
            labels = {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": kind.lower(),
                      "training.kubeflow.org/replica-index": str(i)}
            tf_config = {"cluster": cluster, "task": {"type": kind.lower(), "index": i}, "environment": "cloud"}
            pods.append(Pod(pod_name, labels, spec["template"]["spec"], extra_env={"TF_CONFIG": json.dumps(tf_config)}))
            services.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": pod_name},
                             "spec": {"clusterIP": "None", "selector": labels}})
    return pods, services


def tfjob_documents() -> tuple[dict, list[dict]]:
    documents = [d for d in yaml.safe_load_all(TFJOB.read_text()) if d]
    [job] = [d for d in documents if d["kind"] == "TFJob"]
    return job, documents


def test_the_tfjob_example_is_valid():
    job, documents = tfjob_documents()
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["tfReplicaSpecs"]
    assert set(specs) == {"PS", "Chief", "Worker"}
    # The operator has no published schema here; each replica's pod template is validated as a Pod.
    for kind, spec in specs.items():
        assert spec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode"), kind
        assert [c["name"] for c in spec["template"]["spec"]["containers"]] == ["tensorflow"], kind
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": kind.lower()}, "spec": spec["template"]["spec"]}
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
    for other in documents:
        if other is not job:
            kubernetes_validate.validate(other, KUBE_VERSIONS[-1], strict=True)


def test_the_tfjob_example_trains_with_its_tf_config(pods, image):
    job, documents = tfjob_documents()
    example_pods, services = tfjob_pods(job)
    token = {"comind-token": {"token": b"a token only this test knows"}}  # the example's `kubectl create secret`
    runner = pods([*documents, *services], image=image, secrets=token)
    for pod in example_pods:  # fewer and shorter rounds than the example's, as a user would set them
        pod.extra_env.update(COMIND_ROUNDS="5", COMIND_INTERVAL_STEPS="20")
    by_name = {p.name: p for p in example_pods}
    ps, chief, worker = by_name["comind-ps-0"], by_name["comind-chief-0"], by_name["comind-worker-0"]
    assert json.loads(runner.env(worker)["TF_CONFIG"])["cluster"]["ps"] == ["comind-ps-0.ml.svc:2222"]
    boot_and_train(runner, ps, [chief, worker], rounds=5)


# The quorum rule, in the chart and in the ps ------------------------------------

QUORUMS = [(aggregation, replicas, to_aggregate, trim)
           for aggregation in AGGREGATORS.names() for replicas in (2, 3, 4, 5) for to_aggregate in (0, 3)
           for trim in (0.25, 0.34) if aggregation == "trimmed-mean" or trim == 0.25]


@pytest.mark.parametrize("aggregation, replicas, to_aggregate, trim", QUORUMS)
def test_the_chart_refuses_exactly_the_quorums_the_ps_refuses(helm, aggregation, replicas, to_aggregate, trim):
    """The chart fails at install what the ps would refuse at start (comind/aggregators.py), and nothing else."""
    try:
        AGGREGATORS[aggregation](AggregatorSettings(trim)).check_quorum(to_aggregate or replicas)
        ps_refuses = False
    except ValueError:
        ps_refuses = True
    result = helm_run(helm, "template", RELEASE, str(CHART), "--show-only", "templates/ps.yaml",
                      "--set", f"ps.aggregation={aggregation},workers.replicas={replicas},"
                      f"ps.replicasToAggregate={to_aggregate},ps.trimFraction={trim}", check=False)
    assert (result.returncode != 0) == ps_refuses, result.stderr
