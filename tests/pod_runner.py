"""Runs the pods that the chart (or the TFJob example) describes as Docker containers.

No Kubernetes can run on these machines, so the boot tests do a kubelet's
part themselves, from the rendered objects alone: each container gets its
image, command and args, its environment (values, ConfigMaps and Secrets
through envFrom and valueFrom, the downward API), its ports, its volumes
(emptyDirs and claims as Docker volumes, which outlive a container's restart
as they do a pod's; Secrets as read-only files), its security context (user,
groups, read-only root file system, no capabilities, no privilege
escalation) and memory limit. Every pod joins one Docker network under the
DNS names Kubernetes would give it: those of the Services that select it,
and its own as hostname.subdomain (a StatefulSet's governing Service, an
Indexed Job's headless one). A pod that mounts its service account token
gets one for the API server given as ``kube_api``. Pods come from a
StatefulSet (:func:`statefulset_pods`) or a Job (:func:`job_pods`), as their
controllers make them; a claim (``persistentVolumeClaim``) is one volume for
every pod that names it.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import socket
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import Mount

CLUSTER_DOMAIN = "cluster.local"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_METADATA_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
# Kubernetes expands $(NAME) in command and args from the container's environment; $$ is a literal $.
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise ValueError(f"unsupported memory quantity {quantity!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class KubeApi:
    """How pods reach an API server: its address and the service account files the kubelet mounts."""

    host: str
    port: int
    files: dict[str, bytes]  # token, ca.crt, namespace


@dataclass
class Pod:
    """A pod as a controller would create it from its template."""

    name: str
    labels: dict[str, str]
    spec: dict
    subdomain: str | None = None          # the governing Service of a StatefulSet pod, or spec.subdomain
    claims: dict[str, dict] = field(default_factory=dict)  # volumeClaimTemplates by name
    extra_env: dict[str, str] = field(default_factory=dict)  # what a controller injects (TF_CONFIG, the index)
    hostname: str | None = None           # unset: the pod's name
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.hostname or self.name

    @property
    def container(self) -> dict:
        [container] = self.spec["containers"]
        return container


def statefulset_pods(statefulset: dict, replicas: int | None = None) -> list[Pod]:
    """The pods a StatefulSet controller makes: NAME-0, NAME-1, ..., with their ordinal labels."""
    spec = statefulset["spec"]
    name = statefulset["metadata"]["name"]
    claims = {c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])}
    return [Pod(f"{name}-{i}", {**spec["template"]["metadata"]["labels"], "apps.kubernetes.io/pod-index": str(i),
                                "statefulset.kubernetes.io/pod-name": f"{name}-{i}"},
                spec["template"]["spec"], spec.get("serviceName"), claims)
            for i in range(spec["replicas"] if replicas is None else replicas)]


def job_pods(job: dict, indexes: range | list[int] | None = None) -> list[Pod]:
    """The pods a Job controller makes: for an Indexed Job, one per completion index (all of them, or
    ``indexes``) named JOB-INDEX-xxxxx, with hostname JOB-INDEX, the index in a label, an annotation and
    JOB_COMPLETION_INDEX; else JOB-xxxxx. Called again, it makes replacements, under new names."""
    spec, name = job["spec"], job["metadata"]["name"]
    template = spec["template"]
    labels = {**template["metadata"].get("labels", {}), "job-name": name, "batch.kubernetes.io/job-name": name}
    if spec.get("completionMode") != "Indexed":
        return [Pod(f"{name}-{uuid.uuid4().hex[:5]}", labels, template["spec"], template["spec"].get("subdomain"),
                    hostname=template["spec"].get("hostname"))
                for _ in range(spec.get("parallelism", 1))]
    return [Pod(f"{name}-{i}-{uuid.uuid4().hex[:5]}", {**labels, COMPLETION_INDEX: str(i)}, template["spec"],
                template["spec"].get("subdomain"), extra_env={"JOB_COMPLETION_INDEX": str(i)},
                hostname=f"{name}-{i}", annotations={COMPLETION_INDEX: str(i)})
            for i in (range(spec["completions"]) if indexes is None else indexes)]


def expand(text: str, env: dict[str, str]) -> str:
    """``$(NAME)`` replaced as Kubernetes replaces it in a command: by the variable, left as it is when unset."""
    return _REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def dns_names(name: str, namespace: str) -> list[str]:
    """A Service's (or a pod's, under its governing Service) names, short to fully qualified."""
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"]


class PodRunner:
    """Starts pods as containers on a network of their own; ``close`` removes all it made.

    ``objects`` are what the pods refer to (Services, ConfigMaps, Secrets);
    ``secrets`` adds Secrets made outside them; ``image``, when given,
    replaces the pods' own.
    """

    def __init__(self, client: docker.DockerClient, image: str | None, objects: list[dict], namespace: str,
                 workdir: Path, secrets: dict[str, dict[str, bytes]] | None = None, kube_api: KubeApi | None = None):
        self.client = client
        self.kube_api = kube_api
        self.image = image
        self.namespace = namespace
        self.workdir = workdir
        self.prefix = f"comind-pods-{uuid.uuid4().hex[:8]}"
        self.services = [o for o in objects if o["kind"] == "Service"]
        self.config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
        self.secrets = {o["metadata"]["name"]: {k: base64.b64decode(v) for k, v in o.get("data", {}).items()}
                        for o in objects if o["kind"] == "Secret"}
        self.secrets.update(secrets or {})  # made by someone else: cert-manager, the user
        self.containers: dict[str, docker.models.containers.Container] = {}
        self.pods: dict[str, Pod] = {}
        self._volumes: list[str] = []
        self.network = client.networks.create(self.prefix, driver="bridge", labels={"comind-test": self.prefix})

    # Starting -----------------------------------------------------------------

    def aliases(self, pod: Pod) -> list[str]:
        names = []
        for service in self.services:
            selector = service["spec"].get("selector") or {}
            if selector and selector.items() <= pod.labels.items():
                names += dns_names(service["metadata"]["name"], self.namespace)
        if pod.subdomain:
            names += dns_names(f"{pod.host}.{pod.subdomain}", self.namespace)
        return names

    def env(self, pod: Pod) -> dict[str, str]:
        container = pod.container
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_maps[source["configMapRef"]["name"]])
            else:
                env.update({k: v.decode() for k, v in self.secrets[source["secretRef"]["name"]].items()})
        for var in container.get("env", []):
            env[var["name"]] = var["value"] if "value" in var else self._value_from(pod, var["valueFrom"])
        if self._mounts_service_account(pod):
            env.update(KUBERNETES_SERVICE_HOST=self.kube_api.host, KUBERNETES_SERVICE_PORT=str(self.kube_api.port))
        return {**env, **pod.extra_env}

    def _mounts_service_account(self, pod: Pod) -> bool:
        return self.kube_api is not None and pod.spec.get("automountServiceAccountToken", True)

    def _value_from(self, pod: Pod, source: dict) -> str:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            metadata = _METADATA_FIELD.match(path)
            if metadata:
                return (pod.labels if metadata.group(1) == "labels" else pod.annotations)[metadata.group(2)]
            return {"metadata.name": pod.name, "metadata.namespace": self.namespace}[path]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return self.config_maps[ref["name"]][ref["key"]]
        ref = source["secretKeyRef"]
        return self.secrets[ref["name"]][ref["key"]].decode()

    def _files(self, pod: Pod, volume_name: str, files: dict[str, bytes]) -> Path:
        """Files in a folder of their own, as the kubelet writes a Secret volume."""
        folder = self.workdir / pod.name / volume_name
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            (folder / name).chmod(0o644)  # the kubelet's defaultMode; the container's user is not the owner
        return folder

    def _secret_files(self, pod: Pod, volume: dict) -> Path:
        sources = volume["projected"]["sources"] if "projected" in volume else [{"secret": volume["secret"]}]
        files = {}
        for source in sources:
            secret = source["secret"]
            data = self.secrets[secret.get("secretName") or secret["name"]]
            items = secret.get("items") or [{"key": k, "path": k} for k in data]
            files.update({item["path"]: data[item["key"]] for item in items})
        return self._files(pod, volume["name"], files)

    def _mounts(self, pod: Pod) -> list[Mount]:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        mounts = []
        for mount in pod.container.get("volumeMounts", []):
            name, read_only = mount["name"], mount.get("readOnly", False)
            volume = volumes.get(name, {})
            if "secret" in volume or "projected" in volume:
                source = str(self._secret_files(pod, volume))
                mounts.append(Mount(mount["mountPath"], source, type="bind", read_only=True))
                continue
            if not ("emptyDir" in volume or "persistentVolumeClaim" in volume or name in pod.claims):
                raise AssertionError(f"{pod.name}: volume {name} is of a kind the runner does not know: {volume}")
            # emptyDir: the pod's lifetime; a claim: longer, and shared by the pods that name it. Both outlive a
            # container restart.
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            source = f"{self.prefix}-claim-{claim}" if claim else f"{self.prefix}-{pod.name}-{name}"
            read_only = read_only or volume.get("persistentVolumeClaim", {}).get("readOnly", False)
            if source not in self._volumes:
                self.client.volumes.create(source, labels={"comind-test": self.prefix})
                self._volumes.append(source)
            mounts.append(Mount(mount["mountPath"], source, type="volume", read_only=read_only))
        if self._mounts_service_account(pod):
            source = str(self._files(pod, "kube-api-access", self.kube_api.files))
            mounts.append(Mount(SERVICE_ACCOUNT_DIR, source, type="bind", read_only=True))
        return mounts

    def start(self, pod: Pod) -> docker.models.containers.Container:
        container = pod.container
        security = {**pod.spec.get("securityContext", {}), **container.get("securityContext", {})}
        ports = {f"{p['containerPort']}/tcp": ("127.0.0.1", None) for p in container.get("ports", [])}
        memory = container.get("resources", {}).get("limits", {}).get("memory")
        env = self.env(pod)
        command, args = ([expand(part, env) for part in container[key]] if key in container else None
                         for key in ("command", "args"))
        created = self.client.containers.create(
            container["image"] if self.image is None else self.image,
            name=f"{self.prefix}-{pod.name}", hostname=pod.host,
            # command replaces the image's ENTRYPOINT, args its CMD, as in Kubernetes.
            entrypoint=command, command=args,
            environment=env, mounts=self._mounts(pod), ports=ports,
            user=f"{security['runAsUser']}:{security['runAsGroup']}",
            group_add=[str(security["fsGroup"])] if "fsGroup" in security else None,
            read_only=security.get("readOnlyRootFilesystem", False),
            cap_drop=security.get("capabilities", {}).get("drop"),
            security_opt=["no-new-privileges"] if security.get("allowPrivilegeEscalation") is False else None,
            mem_limit=memory_bytes(memory) if memory else None,
            network=self.network.name,
            networking_config={self.network.name: self.client.api.create_endpoint_config(aliases=self.aliases(pod))},
            labels={"comind-test": self.prefix})
        created.start()
        self.containers[pod.name] = created
        self.pods[pod.name] = pod
        return created

    # Watching -----------------------------------------------------------------

    def container(self, pod_name: str):
        found = self.containers[pod_name]
        found.reload()
        return found

    def logs(self, pod_name: str) -> str:
        return self.containers[pod_name].logs().decode(errors="replace")

    def host_port(self, pod_name: str, port: int | str) -> int:
        """The loopback port that a container port (by number or name) is published on."""
        pod = self.pods[pod_name]
        if isinstance(port, str):
            [port] = [p["containerPort"] for p in pod.container["ports"] if p["name"] == port]
        return int(self.container(pod_name).ports[f"{port}/tcp"][0]["HostPort"])

    def probe(self, pod_name: str, probe: dict) -> bool:
        """Whether a tcpSocket or httpGet probe passes, run from the host as the kubelet would."""
        if "tcpSocket" in probe:
            try:
                socket.create_connection(("127.0.0.1", self.host_port(pod_name, probe["tcpSocket"]["port"])),
                                         timeout=2).close()
                return True
            except OSError:
                return False
        get = probe["httpGet"]
        url = f"http://127.0.0.1:{self.host_port(pod_name, get['port'])}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 400
        except OSError:
            return False

    def wait_until_ready(self, pod_name: str, timeout: float = 120) -> None:
        """Waits for the readiness probe to pass (without one, a running container is ready),
        failing at once if the container stops."""
        probe = self.pods[pod_name].container.get("readinessProbe")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.container(pod_name).status != "running":
                break
            if probe is None or self.probe(pod_name, probe):
                return
            time.sleep(0.5)  # a bounded poll of a container we started
        raise AssertionError(f"{pod_name} never turned ready ({self.container(pod_name).status}); its log:\n"
                             f"{self.logs(pod_name)[-4000:]}")

    def wait_for_log(self, pod_name: str, pattern: str, timeout: float = 120) -> re.Match:
        """The first match of ``pattern`` in the container's log, polling until it comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.logs(pod_name))
            if match:
                return match
            if self.container(pod_name).status != "running":
                break
            time.sleep(0.5)  # a bounded poll of a container we started
        raise AssertionError(f"{pod_name} never logged {pattern!r}; its log:\n{self.logs(pod_name)[-4000:]}")

    def wait_for_exit(self, pod_name: str, timeout: float = 300) -> int:
        return self.containers[pod_name].wait(timeout=timeout)["StatusCode"]

    # Cleaning up --------------------------------------------------------------

    def close(self) -> None:
        for container in self.containers.values():
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for volume in self._volumes:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.volumes.get(volume).remove(force=True)
        self.network.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        label = {"label": f"comind-test={self.prefix}"}
        return ([f"container {c.name}" for c in self.client.containers.list(all=True, filters=label)]
                + [f"volume {v.name}" for v in self.client.volumes.list(filters=label)]
                + [f"network {n.name}" for n in self.client.networks.list(filters=label)])
