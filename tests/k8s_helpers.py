"""A Kubernetes API emulator on loopback (kmock) for the launcher tests, plus a scripted Job controller.

kmock's emulator stores objects and serves create / get / list / patch / delete like an API server;
this module adds the few server behaviours the launcher relies on and kmock 0.8 leaves out.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import rendering

NAMESPACE = "pneumonia"
_LOG_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+))?/?$")


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with label/field selectors on lists and SelfSubjectAccessReviews answered, not stored.

    A real API server filters lists by `labelSelector` / `fieldSelector` and computes access
    reviews without storing them; kmock 0.8 returns every object and would store the first review
    (then answer 409 to the next one, since reviews have no name).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resources.load_bundled()
        # (HTTP method, path, JSON body, query parameters) in arrival order
        self.calls: list[tuple[str, str, Any, dict[str, str]]] = []
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.logs: dict[tuple[str, str], str | Callable[[], str]] = {}
        self["post /apis/authorization.k8s.io/v1/selfsubjectaccessreviews"] << self._review

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 parses /api/v1/namespaces[/NAME] as a namespace prefix, not as the cluster-scoped
        # Namespace resource (POST crashes its parser), so Namespaces are served here.
        log_match = _LOG_PATH.match(raw_request.path)
        if log_match is not None:
            await raw_request.read()
            self.calls.append((raw_request.method, raw_request.path, None, dict(raw_request.query)))
            return self._serve_log(*log_match.groups(), raw_request.query.get("tailLines"))
        match = _NAMESPACE_PATH.match(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        await raw_request.read()
        self.calls.append((raw_request.method, raw_request.path, None, dict(raw_request.query)))
        name = match.group(1)
        if raw_request.method == "POST" and name is None:
            body = await raw_request.json()
            name = body["metadata"]["name"]
            if name in self.namespaces:
                return _status(409, "AlreadyExists", f'namespaces "{name}" already exists')
            self.namespaces[name] = {"apiVersion": "v1", "kind": "Namespace", **body, "status": {"phase": "Active"}}
            return aiohttp.web.json_response(self.namespaces[name], status=201)
        if raw_request.method == "GET" and name is not None:
            if name not in self.namespaces:
                return _status(404, "NotFound", f'namespaces "{name}" not found')
            return aiohttp.web.json_response(self.namespaces[name])
        if raw_request.method == "PATCH" and name in self.namespaces:
            body = await raw_request.json()
            self.namespaces[name]["metadata"].setdefault("labels", {}).update(body.get("metadata", {}).get("labels", {}))
            return aiohttp.web.json_response(self.namespaces[name])
        return _status(405, "MethodNotAllowed", f"{raw_request.method} {raw_request.path} is not emulated")

    def _serve_log(self, namespace: str, pod: str, tail_lines: str | None) -> aiohttp.web.Response:
        # The emulator has no kubelet: tests put a pod's log text (or a function giving it) here.
        source = self.logs.get((namespace, pod))
        if source is None:
            return _status(404, "NotFound", f'pods "{pod}" not found')
        lines = (source() if callable(source) else source).splitlines(keepends=True)
        if tail_lines is not None:
            lines = lines[-int(tail_lines):]
        return aiohttp.web.Response(text="".join(lines), content_type="text/plain")

    async def _handle(self, request: rendering.Request) -> Any:
        self.calls.append((str(request.method.value), request.url.path, request.data, dict(request.params)))
        if request.resource is not None and request.resource.plural == "selfsubjectaccessreviews":
            return await kmock.RawHandler._handle(self, request)
        return await super()._handle(request)

    def _review(self, request: rendering.Request) -> dict[str, Any]:
        # Every review is allowed: what the Role grants is decided by the real authorizer
        # (tests/cluster/test_launcher_rbac.py).
        return {**request.data, "status": {"allowed": True, "reason": ""}}

    async def _serve_version(self, request: rendering.Request) -> Any:
        # kmock 0.8 names the core group version "/v1"; kubectl then maps no core kinds at all.
        listing = await super()._serve_version(request)
        listing["groupVersion"] = listing["groupVersion"].lstrip("/")
        return listing

    async def _serve_list(self, request: rendering.Request) -> Any:
        listing = await super()._serve_list(request)
        labels = _parse_selector(request.params.get("labelSelector", ""))
        fields = _parse_selector(request.params.get("fieldSelector", ""))
        listing["items"] = [item for item in listing["items"]
                            if _matches(item.get("metadata", {}).get("labels") or {}, labels)
                            and _matches_fields(item, fields)]
        return listing


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason,
            "message": message, "metadata": {}}
    return aiohttp.web.json_response(body, status=code)


def _parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    terms = []
    for term in filter(None, (part.strip() for part in text.split(","))):
        for operator in ("!=", "==", "="):
            if operator in term:
                key, _, value = term.partition(operator)
                terms.append((key.strip(), "!=" if operator == "!=" else "=", value.strip()))
                break
        else:
            terms.append((term, "exists", None))
    return terms


def _matches(labels: dict[str, str], terms: list[tuple[str, str, str | None]]) -> bool:
    for key, operator, value in terms:
        if operator == "exists" and key not in labels:
            return False
        if operator == "=" and labels.get(key) != value:
            return False
        if operator == "!=" and labels.get(key) == value:
            return False
    return True


def _matches_fields(item: dict[str, Any], terms: list[tuple[str, str, str | None]]) -> bool:
    for key, operator, value in terms:
        node: Any = item
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (operator == "=" and node != value) or (operator == "!=" and node == value):
            return False
    return True


class EmulatorThread:
    """Runs a ClusterEmulator and its HTTP server on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, emulator: ClusterEmulator) -> None:
        self.emulator = emulator
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as error:  # noqa: BLE001 - surfaced to the test by start()
            self._error = error
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator, host="127.0.0.1") as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self, timeout_s: float = 10.0) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)


def write_kubeconfig(path: Path, server_url: str, context: str = "kmock", namespace: str = NAMESPACE) -> Path:
    """A kubeconfig whose context points at the emulator (token auth: the emulator accepts anything)."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server_url}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": context, "context": {"cluster": "kmock", "user": "tester", "namespace": namespace}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    return path
