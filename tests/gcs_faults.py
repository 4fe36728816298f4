"""Seeded storage faults for the GCS test fixture: some requests get 503 or 429, some connections reset.

Both GCS clients meet them: TensorFlow's gs:// client in the proxy.py plugin (gcs_proxy_plugin.py),
google-cloud-storage in `FaultForwarder`, a small http forwarder between it and the emulator
(STORAGE_EMULATOR_HOST points at the forwarder). Faults are off by default.

Several processes (the proxy, the forwarder, each one serving requests on its own threads) share
one plan, so the plan and the record of what was injected live in files, not in memory:

* the plan, `<faults dir>/plan.json`: {"seed": 7, "rate": 0.03, "kinds": {"503": 1, "429": 1, "reset": 1},
  "rates": {"google-cloud-storage": 0.2}, "only": "PUT /upload/"} ("rates", optional: a client's own rate;
  "only", optional: a text the request's "METHOD path" must contain); absent = no faults. Re-read when it changes, so a test turns faults on and off while servers run.
* the record, `<faults dir>/injected.log`: one line per fault, "<kind> <client> <method> <path>",
  appended (O_APPEND: whole lines even from several processes).

A fault is answered by the fixture; the request never reaches the emulator. One consequence, real
and worth knowing: after TF's upload PUT meets a 503, TF asks for the session's status with an
empty PUT, which fake-gcs-server takes as the last chunk: the object is stored complete and EMPTY
and TF reports success. Stages must therefore check what they wrote (what the tests exercise).

Which request fails is a keyed hash of (seed, method, path without the query, how often this
process has seen that request), not a shared random stream: a retried request (seen again) gets a
fresh draw, and a stage whose requests come in a fixed order (one writer thread) meets the same
faults on every run.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import http.server
import json
import os
import socket
import struct
import sys
import threading
import urllib.parse
from pathlib import Path

FAULTS_DIR_ENV = "GCS_FAULTS_DIR"
PLAN_NAME = "plan.json"
LOG_NAME = "injected.log"
KINDS = ("503", "429", "reset")
STATUS_REASONS = {"503": "Service Unavailable", "429": "Too Many Requests"}
RESPONSE_BODY = b'{"error": {"code": %s, "message": "injected by the test fixture"}}'


class FaultPlan:
    """The plan file of one faults folder, read again whenever it changes; decides per request."""

    def __init__(self, folder: str | os.PathLike[str] | None, client: str) -> None:
        self.folder = Path(folder) if folder else None
        self.client = client  # "tensorflow" or "google-cloud-storage": whose requests this process serves
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._plan: dict | None = None
        self._seen: collections.Counter[str] = collections.Counter()

    def _current(self) -> dict | None:
        if self.folder is None:
            return None
        try:
            stat = (self.folder / PLAN_NAME).stat()
        except FileNotFoundError:
            self._stamp, self._plan = None, None
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                self._plan = json.loads((self.folder / PLAN_NAME).read_text())
            except ValueError:  # caught mid-write: try again at the next request
                return None
            self._stamp = stamp
            self._seen.clear()
        return self._plan

    def decide(self, method: str, path: str) -> str | None:
        """The fault kind for this request ("503", "429", "reset"), or None to serve it."""
        with self._lock:
            plan = self._current()
            rate = (plan or {}).get("rates", {}).get(self.client, (plan or {}).get("rate", 0))
            if rate <= 0:
                return None
            # Without the query: an upload's session id is random, and would make the choice so.
            key = f"{method} {path.split('?')[0]}"
            if plan.get("only") and plan["only"] not in key:
                return None
            self._seen[key] += 1
            occurrence = self._seen[key]
        digest = hashlib.sha256(f"{plan['seed']}|{key}|{occurrence}".encode()).digest()
        draw, pick = struct.unpack(">QQ", digest[:16])
        if draw / 2**64 >= rate:
            return None
        weights = [(kind, float(plan.get("kinds", {}).get(kind, 0))) for kind in KINDS]
        total = sum(weight for _, weight in weights)
        if total <= 0:
            return None
        point = pick / 2**64 * total
        for kind, weight in weights:
            point -= weight
            if point < 0:
                return kind
        return weights[-1][0]

    def record(self, kind: str, method: str, path: str) -> None:
        line = f"{kind} {self.client} {method} {path.split('?')[0]}\n".encode()
        fd = os.open(self.folder / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def status_response(kind: str) -> bytes:
    """A complete 503/429 response that closes the connection, as a front end under load sends."""
    body = RESPONSE_BODY % kind.encode()
    head = (f"HTTP/1.1 {kind} {STATUS_REASONS[kind]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 0\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def reset(sock: socket.socket) -> None:
    """Closes with RST (linger 0): the client sees "connection reset by peer", not a clean close."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def read_injected(folder: str | os.PathLike[str]) -> collections.Counter[str]:
    """Faults injected so far, by "<kind> <client>" (tensorflow or google-cloud-storage)."""
    try:
        lines = (Path(folder) / LOG_NAME).read_text().splitlines()
    except FileNotFoundError:
        return collections.Counter()
    return collections.Counter(" ".join(line.split()[:2]) for line in lines if line.strip())


# ---------------------------------------------------------------------------------------- forwarder

_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "trailer"}


class _ForwardingHandler(http.server.BaseHTTPRequestHandler):
    """Forwards one request at a time to the emulator, unless the plan says to fail it."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: FaultForwarder

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _forward(self) -> None:
        body = self._read_body()
        kind = self.server.plan.decide(self.command, self.path)
        if kind is not None:
            self.server.plan.record(kind, self.command, self.path)
            if kind == "reset":
                self.close_connection = True
                reset(self.connection)
                return
            self.wfile.write(status_response(kind))
            self.close_connection = True
            return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() in _HOP_HEADERS or name.lower() == "content-length":
                continue
            if name.lower() == "location":  # resumable-upload sessions: keep them coming through here
                value = value.replace(self.server.upstream_url, self.server.url)
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward  # noqa: N815 - http.server's names


class FaultForwarder(http.server.ThreadingHTTPServer):
    """http://<host>:<port> -> the emulator, with the plan's faults; loopback by default (the cluster
    test bed's containers reach it on their network's gateway address)."""

    daemon_threads = True

    def __init__(self, upstream: str, faults_dir: str | None, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _ForwardingHandler)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.upstream_url = upstream.rstrip("/")
        self.url = f"http://{host}:{self.server_address[1]}"
        self.plan = FaultPlan(faults_dir, "google-cloud-storage")


def main(argv: list[str]) -> None:
    """python gcs_faults.py UPSTREAM_URL PORT_FILE [HOST]: serve until terminated (GCS_FAULTS_DIR names the plan)."""
    upstream, port_file, *host = argv
    server = FaultForwarder(upstream, os.environ.get(FAULTS_DIR_ENV), *host)
    temp = Path(f"{port_file}.tmp")
    temp.write_text(f"{server.server_address[1]}\n")
    temp.rename(port_file)  # whole, so the fixture never reads half a number
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
