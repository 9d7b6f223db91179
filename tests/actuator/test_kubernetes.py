"""The kubernetes backend against a local server speaking the Deployment `scale` subresource
(autoscaling/v1 Scale, Status errors), as the API server does. No real cluster here."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from sair.stack import ManagedServer
from services.actuator.backends import ActionRef, BackendUnavailable
from services.actuator.backends.kubernetes import KubeConfig, KubernetesBackend
from tests.actuator.factories import make_action, make_spec, sa
from tests.actuator.test_app import results_of, send, start

TOKEN = "test-token-123"
SCALE_PATH = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def scale(ns: str, name: str, replicas: int) -> dict[str, Any]:
    return {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "4711"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app={name}"},
    }  # fmt: skip


@dataclass
class FakeApiServer:
    """Deployments by (namespace, name) -> replicas; records every request."""

    deployments: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    always_conflict: set[str] = field(default_factory=set)
    unavailable_times: int = 0
    url: str = ""


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    yield from _serve(FakeApiServer(), None)


def _serve(state: FakeApiServer, tls: ssl.SSLContext | None) -> Iterator[FakeApiServer]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[str, str] | None:
            parts = self.path.split("/")
            # /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale
            if (
                len(parts) == 9
                and parts[1:5] == ["apis", "apps", "v1", "namespaces"]
                and parts[6] == "deployments"
                and parts[8] == "scale"
            ):
                return parts[5], parts[7]
            return None

        def _common(self, body: bytes) -> tuple[str, str] | None:
            state.requests.append({
                "method": self.command, "path": self.path, "body": body,
                "content_type": self.headers.get("Content-Type"),
                "auth": self.headers.get("Authorization"),
            })  # fmt: skip
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._reply(401, status(401, "Unauthorized", "Unauthorized"))
                return None
            if state.unavailable_times > 0:
                state.unavailable_times -= 1
                self._reply(503, status(503, "ServiceUnavailable", "etcd leader changed"))
                return None
            route = self._route()
            if route is None or route not in state.deployments:
                name = route[1] if route else self.path
                self._reply(404, status(404, "NotFound", f'deployments.apps "{name}" not found'))
                return None
            return route

        def do_GET(self) -> None:
            route = self._common(b"")
            if route:
                self._reply(200, scale(*route, state.deployments[route]))

        def do_PATCH(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            route = self._common(body)
            if not route:
                return
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                self._reply(415, status(415, "UnsupportedMediaType", "unsupported media type"))
                return
            if route[1] in state.always_conflict:
                self._reply(
                    409,
                    status(
                        409,
                        "Conflict",
                        "Operation cannot be fulfilled on "
                        "deployments.apps: the object has been modified",
                    ),
                )
                return
            state.deployments[route] = json.loads(body)["spec"]["replicas"]
            self._reply(200, scale(*route, state.deployments[route]))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls else "http"
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def backend_for(api: FakeApiServer, **kw: Any) -> KubernetesBackend:
    return KubernetesBackend(KubeConfig(server=api.url, token=TOKEN, **kw))


async def test_patch_speaks_the_scale_subresource(api: FakeApiServer) -> None:
    spec = make_spec(namespace="ml")
    api.deployments[("ml", "pre")] = 1
    backend = backend_for(api)
    try:
        outcome = await backend.apply(spec, ActionRef("a1", 1.0), [sa("pre", 4)])
        assert outcome.failures == () and [a.target_replicas for a in outcome.applied] == [4]
        (req,) = api.requests
        assert req["method"] == "PATCH"
        assert req["path"] == SCALE_PATH.format(ns="ml", name="pre")
        assert req["content_type"] == "application/merge-patch+json"
        assert req["auth"] == f"Bearer {TOKEN}"
        assert json.loads(req["body"]) == {"spec": {"replicas": 4}}
        assert api.deployments[("ml", "pre")] == 4
        current = await backend.current(spec)
        assert current["pre"].replicas == 4
    finally:
        await backend.close()


async def test_errors_give_clear_definitive_failures(api: FakeApiServer) -> None:
    spec = make_spec(namespace="ml")
    api.deployments[("ml", "infer")] = 1
    api.always_conflict.add("infer")  # pre does not exist at all; post has no target
    backend = backend_for(api)
    try:
        outcome = await backend.apply(
            spec, ActionRef("a2", 1.0), [sa("pre", 2), sa("infer", 2), sa("post", 2)]
        )
        assert outcome.applied == ()
        pre, infer, post = outcome.failures
        assert "deployment ml/pre: not found (404 NotFound" in pre
        assert 'deployments.apps "pre" not found' in pre
        assert "deployment ml/infer: conflict persisted over 3 attempts (409 Conflict" in infer
        assert "no [kubernetes] target" in post
        assert sum(r["path"].endswith("/infer/scale") for r in api.requests) == 3
    finally:
        await backend.close()
    wrong = KubernetesBackend(KubeConfig(server=api.url, token="stolen"))
    try:
        outcome = await wrong.apply(spec, ActionRef("a3", 1.0), [sa("infer", 2)])
        assert "the token was refused (401 Unauthorized" in outcome.failures[0]
    finally:
        await wrong.close()


async def test_unavailable_server_is_retryable_not_failed(api: FakeApiServer) -> None:
    spec = make_spec(namespace="ml")
    api.deployments[("ml", "pre")] = 1
    api.unavailable_times = 1
    backend = backend_for(api)
    try:
        with pytest.raises(BackendUnavailable, match="503 ServiceUnavailable"):
            await backend.apply(spec, ActionRef("a4", 1.0), [sa("pre", 2)])
        assert (await backend.apply(spec, ActionRef("a4", 1.0), [sa("pre", 2)])).failures == ()
    finally:
        await backend.close()
    closed = KubernetesBackend(KubeConfig(server="http://127.0.0.1:9", token=TOKEN))
    try:
        with pytest.raises(BackendUnavailable):
            await closed.apply(spec, ActionRef("a5", 1.0), [sa("pre", 2)])
    finally:
        await closed.close()


async def test_actuator_with_kubernetes_backend_reports_per_stage(
    api: FakeApiServer, nats_server: ManagedServer, redis_server: ManagedServer, nc: NatsClient
) -> None:
    spec = make_spec(namespace="ml")
    api.deployments[("ml", "pre")] = 2
    api.deployments[("ml", "infer")] = 1
    results = await results_of(nc, spec)
    app = await start(nats_server, redis_server.url, spec, backend="kubernetes",
                      kube_config=KubeConfig(server=api.url, token=TOKEN))  # fmt: skip
    try:
        ok = make_action(spec, sa("pre", 3), sa("infer", 2, 0.5))
        await send(nc, ok)
        result = await results.wait_for(lambda r: r.action_id == ok.action_id)
        assert result.status == "applied" and result.backend == "kubernetes"
        assert api.deployments == {("ml", "pre"): 3, ("ml", "infer"): 2}
        del api.deployments[("ml", "infer")]
        gone = make_action(spec, sa("pre", 4), sa("infer", 1))
        await send(nc, gone)
        result = await results.wait_for(lambda r: r.action_id == gone.action_id)
        assert result.status == "failed"
        assert [a.stage for a in result.applied] == ["pre"]
        assert any("ml/infer: not found (404" in r for r in result.reasons)
    finally:
        await app.close()


@pytest.fixture
def tls_api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    for state in _serve(FakeApiServer(), ctx):
        yield state, cert


async def test_https_with_the_cluster_ca_and_a_token_file(
    tls_api: tuple[FakeApiServer, Path], tmp_path: Path
) -> None:
    api, cert = tls_api
    api.deployments[("ml", "pre")] = 1
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    spec = make_spec(namespace="ml")
    backend = KubernetesBackend(
        KubeConfig(server=api.url, token_file=str(token_file), ca_file=str(cert))
    )
    try:
        assert (await backend.apply(spec, ActionRef("t1", 1.0), [sa("pre", 2)])).failures == ()
    finally:
        await backend.close()
    untrusted = KubernetesBackend(KubeConfig(server=api.url, token=TOKEN))
    try:
        with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.apply(spec, ActionRef("t2", 1.0), [sa("pre", 2)])
    finally:
        await untrusted.close()


def test_config_from_env() -> None:
    cfg = KubeConfig.from_env({"SAIR_K8S_SERVER": "https://k8s:6443/", "SAIR_K8S_TOKEN": "x"})
    assert cfg.server == "https://k8s:6443" and cfg.bearer() == "x"
    with pytest.raises(ValueError, match="SAIR_K8S_TOKEN"):
        KubeConfig.from_env({"SAIR_K8S_SERVER": "https://k8s:6443"})
    with pytest.raises(ValueError, match="not in a cluster"):
        KubeConfig.from_env({})
    assert asyncio.iscoroutinefunction(KubernetesBackend.apply)
