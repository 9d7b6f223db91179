"""The `kubernetes` backend: patches the `scale` subresource of each stage's Deployment.

Speaks the API directly over HTTPS with httpx (the kubernetes client package is not a
dependency): `PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`, content type
`application/merge-patch+json`, body `{"spec":{"replicas":N}}`, bearer token; the reply is an
`autoscaling/v1` `Scale`. Reads use `GET` on the same path.

Configuration: in-cluster (KUBERNETES_SERVICE_HOST/PORT and the service-account token and CA
under /var/run/secrets/kubernetes.io/serviceaccount/), or explicit settings
(SAIR_K8S_SERVER, SAIR_K8S_TOKEN or SAIR_K8S_TOKEN_FILE, SAIR_K8S_CA_FILE). Kubeconfig files are
not read: they are YAML and no YAML parser is installed.

rho is not a Kubernetes concept: the GPU share is enforced through the Redis token buckets.
Tested against a local HTTP server speaking the scale subresource, not yet a real cluster.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from schemas.messages import StageAction
from schemas.pipeline import PipelineSpec, StageSpec

from ..guard import CurrentStage
from . import ActionRef, ApplyOutcome, BackendUnavailable

log = logging.getLogger("sair.actuator.kubernetes")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 5.0
CONFLICT_RETRIES = 3
"""409 on a merge patch without resourceVersion means the server lost its own optimistic
update race; a couple of immediate retries settle it, more would hide a real problem."""

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""Worth retrying later: the action is kept, not failed."""


class KubeConfigError(ValueError):
    """The Kubernetes settings are missing or unusable."""


@dataclass(frozen=True)
class KubeConfig:
    server: str
    """e.g. https://10.0.0.1:443"""
    token: str | None = None
    token_file: str | None = None
    """Read on every request: projected service-account tokens are rotated."""
    ca_file: str | None = None
    """None: the system trust store (or plain http for a test server)."""

    def bearer(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KubeConfigError(f"token_file={self.token_file!r}: {exc}") from exc
        return self.token

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] | None = None) -> KubeConfig:
        e = os.environ if env is None else env
        host, port = e.get("KUBERNETES_SERVICE_HOST"), e.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeConfigError(
                "not in a cluster: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set"
            )
        token_file = SERVICE_ACCOUNT_DIR / "token"
        if not token_file.is_file():
            raise KubeConfigError(f"service-account token {token_file} is missing")
        host = f"[{host}]" if ":" in host else host
        ca = SERVICE_ACCOUNT_DIR / "ca.crt"
        return cls(
            server=f"https://{host}:{port}",
            token_file=str(token_file),
            ca_file=str(ca) if ca.is_file() else None,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubeConfig:
        """Explicit SAIR_K8S_* settings when SAIR_K8S_SERVER is set, else in-cluster."""
        e = os.environ if env is None else env
        server = e.get("SAIR_K8S_SERVER")
        if not server:
            return cls.in_cluster(e)
        if not server.startswith(("https://", "http://")):
            raise KubeConfigError(
                f"SAIR_K8S_SERVER={server!r}: must start with https:// or http://"
            )
        token, token_file = e.get("SAIR_K8S_TOKEN") or None, e.get("SAIR_K8S_TOKEN_FILE") or None
        if token is None and token_file is None:
            raise KubeConfigError("set SAIR_K8S_TOKEN or SAIR_K8S_TOKEN_FILE with SAIR_K8S_SERVER")
        return cls(
            server=server.rstrip("/"),
            token=token,
            token_file=token_file,
            ca_file=e.get("SAIR_K8S_CA_FILE") or None,
        )


def scale_path(namespace: str, deployment: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"


def describe_status(code: int, body: bytes) -> str:
    """`404 NotFound: deployments.apps "x" not found` from a Status object, or the raw text."""
    try:
        status: Any = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("kind") == "Status":
        return f"{code} {status.get('reason') or ''}: {status.get('message') or ''}".strip()
    text = body[:200].decode("utf-8", errors="replace").strip()
    return f"{code}: {text}" if text else f"HTTP {code}"


class KubernetesBackend:
    name = "kubernetes"
    applies = True

    def __init__(self, config: KubeConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        verify: ssl.SSLContext | bool = True
        if config.ca_file:
            verify = ssl.create_default_context(cafile=config.ca_file)
        self.client = client or httpx.AsyncClient(
            base_url=config.server, verify=verify, timeout=REQUEST_TIMEOUT_S
        )

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _send(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        try:
            headers = self._headers(MERGE_PATCH if body is not None else None)
        except KubeConfigError as exc:  # a rotated token file can be briefly missing
            raise BackendUnavailable(str(exc)) from exc
        try:
            return await self.client.request(method, path, content=body, headers=headers)
        except (httpx.TransportError, OSError) as exc:
            raise BackendUnavailable(f"kubernetes API {self.config.server}: {exc!r}") from exc

    async def read_scale(self, target: StageSpec) -> int | None:
        """spec.replicas of the stage's Deployment; None when it has no kubernetes target."""
        if target.kubernetes is None:
            return None
        k = target.kubernetes
        resp = await self._send("GET", scale_path(k.namespace, k.deployment))
        if resp.status_code in TRANSIENT_STATUS:
            raise BackendUnavailable(
                f"GET scale of {k.namespace}/{k.deployment}: "
                f"{describe_status(resp.status_code, resp.content)}"
            )
        if resp.status_code != 200:
            log.warning(
                "GET scale of %s/%s: %s",
                k.namespace,
                k.deployment,
                describe_status(resp.status_code, resp.content),
            )
            return None
        return _replicas_of(resp)

    async def current(self, spec: PipelineSpec) -> dict[str, CurrentStage]:
        out: dict[str, CurrentStage] = {}
        for stage in spec.stages:
            replicas = await self.read_scale(stage)
            if replicas is not None:
                out[stage.name] = CurrentStage(replicas=replicas)
        return out

    async def apply(
        self, spec: PipelineSpec, ref: ActionRef, stages: Sequence[StageAction]
    ) -> ApplyOutcome:
        applied: list[StageAction] = []
        failures: list[str] = []
        for action in stages:
            why = await self._patch(spec.stage(action.stage), action.target_replicas)
            if why is None:
                applied.append(action)
            else:
                failures.append(why)
        return ApplyOutcome(tuple(applied), tuple(failures))

    async def _patch(self, stage: StageSpec, replicas: int) -> str | None:
        """PATCH one Deployment's scale; None on success, else the definitive reason."""
        if stage.kubernetes is None:
            return (
                f"stage {stage.name!r}: no [kubernetes] target (namespace, deployment) in the spec"
            )
        k = stage.kubernetes
        where = f"stage {stage.name!r}: deployment {k.namespace}/{k.deployment}"
        body = json.dumps({"spec": {"replicas": replicas}}).encode()
        resp = await self._send("PATCH", scale_path(k.namespace, k.deployment), body)
        for _ in range(CONFLICT_RETRIES - 1):
            if resp.status_code != 409:
                break
            resp = await self._send("PATCH", scale_path(k.namespace, k.deployment), body)
        code = resp.status_code
        if code in TRANSIENT_STATUS:
            raise BackendUnavailable(f"{where}: {describe_status(code, resp.content)}")
        if code == 200:
            got = _replicas_of(resp)
            if got != replicas:
                return f"{where}: server answered spec.replicas={got}, asked for {replicas}"
            return None
        hint = {
            401: "the token was refused",
            403: "the service account may not patch deployments/scale",
            404: "not found",
            409: f"conflict persisted over {CONFLICT_RETRIES} attempts",
            422: "rejected as invalid",
        }.get(code, "failed")
        return f"{where}: {hint} ({describe_status(code, resp.content)})"

    async def close(self) -> None:
        await self.client.aclose()


def _replicas_of(resp: httpx.Response) -> int | None:
    try:
        scale = resp.json()
        replicas = scale["spec"].get("replicas", 0)
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    return replicas if isinstance(replicas, int) else None
