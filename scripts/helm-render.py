#!/usr/bin/env python3
"""Lint and render the Helm chart with Helm's own engine, and validate what it renders.

Helm's library comes from PyPI (`helm-sdkpy`, a binding of Helm's Go packages). Its Lint
action checks the chart; rendering is Helm's install action with the in-memory release
driver against a throw-away API endpoint that serves only discovery and accepts what is
created (nothing leaves this process). The manifest Helm records for the release is the
render, exactly as `helm template` would print it.

Every rendered object of a built-in kind is validated, strictly (unknown fields are errors),
against the Kubernetes OpenAPI schemas of `kubernetes-validate`.

    helm-render.py CHART [--namespace NS] [--values FILE]... [--set-json JSON]...
                   [--write OUT | --check OUT] [--validate] [--kube-version 1.34]
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HEADER = (
    "# Generated from deploy/helm/switchyard with its default values\n"
    "# (`python3 scripts/helm-render.py deploy/helm/switchyard --write deploy/switchyard.yaml`);\n"
    "# a test fails when the two differ. Edit the chart, not this file.\n"
)

# What the chart can create: (group, version) -> [(resource, kind, namespaced)].
RESOURCES = {
    ("", "v1"): [
        ("configmaps", "ConfigMap", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("secrets", "Secret", True),
        ("namespaces", "Namespace", False),
    ],
    ("apps", "v1"): [("daemonsets", "DaemonSet", True)],
    ("rbac.authorization.k8s.io", "v1"): [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    ("monitoring.coreos.com", "v1"): [("servicemonitors", "ServiceMonitor", True)],
}
BUILTIN_GROUPS = {"", "apps", "rbac.authorization.k8s.io"}


class Discovery(BaseHTTPRequestHandler):
    """Enough of the API for Helm to map kinds to resources and create them."""

    def send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        path = self.path.split("?")[0]
        if path == "/version":
            return self.send(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0"})
        if path == "/api":
            return self.send(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/apis":
            groups = [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                    "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                }
                for (g, v) in RESOURCES
                if g
            ]
            return self.send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        for (g, v), res in RESOURCES.items():
            if path == (f"/apis/{g}/{v}" if g else f"/api/{v}"):
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                return self.send(
                    200,
                    {
                        "kind": "APIResourceList",
                        "apiVersion": "v1",
                        "groupVersion": f"{g}/{v}" if g else v,
                        "resources": [
                            {"name": r, "singularName": "", "namespaced": ns, "kind": k, "verbs": verbs}
                            for (r, k, ns) in res
                        ],
                    },
                )
        if self.command == "POST":
            return self.send(201, json.loads(body))
        return self.send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, *args):
        pass


def render(chart, namespace, values):
    import helm_sdkpy as helm

    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False) as kc:
        kc.write(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: render, cluster: {{server: 'http://127.0.0.1:{server.server_address[1]}'}}}}]\n"
            "users: [{name: render, user: {token: render}}]\n"
            "contexts: [{name: render, context: {cluster: render, user: render}}]\n"
            "current-context: render\n"
        )
    try:
        cfg = helm.Configuration(namespace=namespace, kubeconfig=kc.name)
        lint = asyncio.run(helm.Lint(cfg).run(chart))
        # Helm's severities: 1 info, 2 warning, 3 error.
        bad = [m for m in lint.get("Messages") or [] if m.get("Severity", 0) >= 2]
        if lint.get("Errors") or bad:
            sys.exit(f"helm lint {chart}: {json.dumps(lint.get('Errors') or bad)}")
        rel = asyncio.run(helm.Install(cfg).run("switchyard", chart, values=values, wait=False, timeout=60))
        return rel["manifest"]
    finally:
        server.shutdown()
        os.unlink(kc.name)


def validate(manifest, version):
    import kubernetes_validate
    import yaml

    errors = []
    for doc in yaml.safe_load_all(manifest):
        if not doc:
            continue
        group = doc["apiVersion"].rpartition("/")[0]
        what = f"{doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"
        if group not in BUILTIN_GROUPS:
            # Not in the Kubernetes schemas (a CRD's kind): the shape is checked by the tests.
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{what}: {'.'.join(str(p) for p in e.path)}: {e.message}")
    if errors:
        sys.exit("invalid objects:\n" + "\n".join(errors))


def main():
    if os.environ.get("HELM_DRIVER") != "memory":
        # Helm's library reads its release driver from the environment it was started with:
        # releases in memory, so nothing is stored anywhere.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "HELM_DRIVER": "memory"})
    ap = argparse.ArgumentParser()
    ap.add_argument("chart")
    ap.add_argument("--namespace", default="kube-system")
    ap.add_argument("--values", action="append", default=[], help="YAML values file (repeatable)")
    ap.add_argument("--set-json", action="append", default=[], help="JSON object merged into the values")
    ap.add_argument("--write")
    ap.add_argument("--check")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--kube-version", default="1.34")
    a = ap.parse_args()

    import yaml

    values = {}

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    for f in a.values:
        with open(f) as fh:
            merge(values, yaml.safe_load(fh) or {})
    for j in a.set_json:
        merge(values, json.loads(j))

    manifest = render(os.path.abspath(a.chart), a.namespace, values or None)
    if a.validate:
        validate(manifest, a.kube_version)
    out = HEADER + manifest
    if a.write:
        with open(a.write, "w") as fh:
            fh.write(out)
    elif a.check:
        with open(a.check) as fh:
            have = fh.read()
        if have != out:
            import difflib

            diff = "".join(difflib.unified_diff(have.splitlines(True), out.splitlines(True), a.check, "render"))
            sys.exit(f"{a.check} differs from the chart's default render (regenerate with --write):\n{diff}")
    else:
        sys.stdout.write(out)


if __name__ == "__main__":
    main()
