"""A Kubernetes API server just big enough for Helm's `lookup` and the chart's deployment check.

No API server runs on these machines, so the tests that need one talk to
this: discovery of the kinds the chart renders, GET of the objects it was
given, and empty lists (Helm's release history). Everything else is 404.
On loopback over plain HTTP for Helm and the kubernetes client; in a
container over HTTPS for a pod's in-cluster client:

    python fake_kube_api.py --port 6443 --cert tls.crt --key tls.key OBJECTS.json
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Discovery documents: which kinds the server knows, by group and version.
RESOURCES = {
    "v1": [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"),
           ("serviceaccounts", "ServiceAccount"), ("pods", "Pod"),
           ("persistentvolumeclaims", "PersistentVolumeClaim")],
    "apps/v1": [("statefulsets", "StatefulSet")],
    "batch/v1": [("jobs", "Job")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
    "rbac.authorization.k8s.io/v1": [("roles", "Role"), ("rolebindings", "RoleBinding")],
}
_OBJECT = re.compile(r"^/(?:api|apis/[^/]+)/(v\d\w*)/namespaces/([^/]+)/([^/]+)/([^/]+)$")
_COLLECTION = re.compile(r"^/(?:api|apis/[^/]+)/(v\d\w*)/namespaces/([^/]+)/([^/]+)$")


class FakeKubeApi:
    """Serves ``objects`` (Kubernetes objects as dicts) on 127.0.0.1 until stopped."""

    def __init__(self, objects: list[dict] = (), host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.objects = list(objects)
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer((host, port), self._handler())
        if tls:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def find(self, api_version: str, resource: str, namespace: str, name: str) -> dict | None:
        kinds = dict(RESOURCES.get(api_version, []))
        for obj in self.objects:
            meta = obj["metadata"]
            if (obj["apiVersion"] == api_version and obj["kind"] == kinds.get(resource)
                    and meta["name"] == name and meta.get("namespace", "default") == namespace):
                return obj
        return None

    def answer(self, path: str) -> tuple[int, dict]:
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                       "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                      for gv in RESOURCES if "/" in gv]
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        for gv, resources in RESOURCES.items():
            if path == ("/api/" if "/" not in gv else "/apis/") + gv:
                return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                    {"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                     "verbs": ["get", "list"]} for name, kind in resources]}
        match = _OBJECT.match(path)
        if match:
            version, namespace, resource, name = match.groups()
            group = path.split("/")[2] if path.startswith("/apis/") else ""
            found = self.find(f"{group}/{version}" if group else version, resource, namespace, name)
            if found:
                return 200, found
        if _COLLECTION.match(path):  # Helm's release history: none
            return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []}
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                     "message": f"{path} not found", "code": 404}

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                api.requests.append(path)
                status, body = api.answer(path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serves OBJECTS (a JSON list) as a fake Kubernetes API.")
    parser.add_argument("objects")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    flags = parser.parse_args()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(flags.cert, flags.key)
    with open(flags.objects) as file:
        api = FakeKubeApi(json.load(file), host="0.0.0.0", port=flags.port, tls=tls)
    print(f"serving on {api.url}", flush=True)
    api._server.serve_forever()


if __name__ == "__main__":
    main()
