"""proxy.py (2.4.10) plugins that put TensorFlow's compiled-in GCS endpoints onto fake-gcs-server.

Loaded by the proxy process that `gcs_emulator.GcsEmulator` starts (`--plugins`, with this folder
on PYTHONPATH); the test process never imports it. Only the proxy needs `proxy.py`.

Why two classes: proxy.py's stock TLS interception (`HttpProxyPlugin.intercept`) first opens TLS
*to the upstream* and copies its certificate's subject, shelling out to `openssl` to sign a
per-host certificate. Our upstream is the emulator's plain-http port, so that handshake can only
fail. `GcsInterceptingProxy` replaces the core proxy plugin (the proxy runs with
`--disable-http-proxy`) and overrides only `intercept`: TLS toward the client with the one leaf
certificate the fixture made (signed by its throwaway CA), plain TCP toward the emulator. No
`openssl` process is involved. `GcsRoute` is an ordinary HttpProxyBasePlugin that picks the
upstream and repairs requests and responses (see its methods for the four quirks it covers).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

from gcs_faults import FAULTS_DIR_ENV, RESPONSE_BODY, STATUS_REASONS, FaultPlan
from proxy.http.exception import HttpRequestRejected
from proxy.http.parser import HttpParser, httpParserStates
from proxy.http.proxy import HttpProxyBasePlugin, HttpProxyPlugin

# TensorFlow's GCS client talks to these two hosts (metadata and uploads; object reads).
GCS_HOSTS = (b"www.googleapis.com", b"storage.googleapis.com")
# Where the emulator listens, e.g. "127.0.0.1:4443"; set by the fixture in the proxy's environment.
UPSTREAM_ENV = "GCS_EMULATOR_UPSTREAM"
# The leaf certificate (SANs: both GCS hosts, localhost, 127.0.0.1) lives in --ca-cert-dir.
LEAF_CERT_NAME = "leaf.pem"
# Seeded 503/429/resets for TF's requests when the test turns them on (gcs_faults.py); one per process.
_FAULTS = FaultPlan(os.environ.get(FAULTS_DIR_ENV), "tensorflow")


def _upstream() -> tuple[bytes, int]:
    host, _, port = os.environ[UPSTREAM_ENV].rpartition(":")
    return host.encode("ascii"), int(port)


class GcsRoute(HttpProxyBasePlugin):
    """Sends the GCS hosts to the emulator, refuses everything else, fixes TF's empty uploads, and
    fails the requests the test's fault plan picks (gcs_faults.py) before they reach the emulator."""

    def before_upstream_connection(self, request: HttpParser) -> HttpParser | None:
        if request.host not in GCS_HOSTS:
            # Tests must never reach the internet (nor hang trying): fail the request at once.
            raise HttpRequestRejected(status_code=403, reason=b"only GCS hosts are served here")
        # CONNECT www.googleapis.com:443 -> a plain TCP connection to the emulator; the original
        # Host header inside the tunnel is kept (fake-gcs-server routes storage.googleapis.com
        # path-style downloads by it).
        request.host, request.port = _upstream()
        return request

    def handle_client_request(self, request: HttpParser) -> HttpParser | None:
        if request.method != b"CONNECT":  # faults hit the requests inside the tunnel, as GCS's would
            self._inject_fault(request)
        # The proxy holds the whole request by now, so it goes upstream with a plain
        # Content-Length, whatever framing TF's libcurl chose:
        # - "Transfer-Encoding: identity" (empty-body POST/PUT, e.g. a resumable upload's status
        #   query): Go's net/http answers 501 to any transfer coding but chunked.
        # - "Transfer-Encoding: chunked" *and* "Content-Length: 0" (TF's upload of an empty file):
        #   proxy.py 2.4.10 forwards an empty chunked body without its final "0" chunk, and the
        #   emulator waits for it until curl times out (10 s, then a retry).
        if request.has_header(b"transfer-encoding"):
            request.del_header(b"transfer-encoding")
            request._is_chunked_encoded = False  # noqa: SLF001 - else build() re-chunks the body
            request.add_header(b"Content-Length", str(len(request.body or b"")).encode("ascii"))
        return request

    def _inject_fault(self, request: HttpParser) -> None:
        method, path = request.method.decode(), (request.path or b"").decode(errors="replace")
        kind = _FAULTS.decide(method, path)
        if kind is None:
            return
        _FAULTS.record(kind, method, path)
        if kind == "reset":
            # The request never reaches the emulator; the client's TLS connection ends in a RST.
            with contextlib.suppress(OSError):
                self.client.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise HttpRequestRejected()
        raise HttpRequestRejected(status_code=int(kind), reason=STATUS_REASONS[kind].encode(),
                                  body=RESPONSE_BODY % kind.encode(),
                                  headers={b"Content-Type": b"application/json", b"Retry-After": b"0"})

    def handle_upstream_chunk(self, chunk: memoryview) -> memoryview | None:
        # fake-gcs-server builds a resumable upload's Location from the request's Host with its own
        # scheme: "http://www.googleapis.com/upload/...". libcurl would send that to the real host
        # in the clear (no http_proxy), so point it back through this proxy with https, as real GCS
        # does. Only a chunk that starts a response and holds the whole header block is touched
        # (TF sends one request at a time per connection, so a response starts a chunk), and only
        # inside the header block, so Content-Length stays right.
        data = chunk.tobytes()
        if not data.startswith(b"HTTP/1."):
            return chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep or b"\nlocation: http://" not in head.lower():
            return chunk
        lines = head.split(b"\r\n")
        for index, line in enumerate(lines):
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"location":
                for host in GCS_HOSTS:
                    value = value.replace(b"http://" + host + b"/", b"https://" + host + b"/")
                lines[index] = name + b":" + value
        return memoryview(b"\r\n".join(lines) + sep + body)


class GcsInterceptingProxy(HttpProxyPlugin):
    """The core HTTP proxy, whose TLS interception speaks plain http to the upstream."""

    _CONTINUE = memoryview(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_client_data(self, raw: memoryview) -> None:
        super().on_client_data(raw)
        # libcurl sends "Expect: 100-continue" with upload bodies and waits up to 1 s for the
        # interim response before sending the body anyway. proxy.py forwards a request only once
        # it is complete, so nothing would answer and every TF upload would stall a second.
        # Answer it here and drop the header, so the emulator does not answer it a second time.
        pending = self.pipeline_request
        if (pending is not None and pending.state >= httpParserStates.HEADERS_COMPLETE
                and not pending.is_complete and pending.has_header(b"expect")
                and pending.header(b"expect").lower() == b"100-continue"):
            pending.del_header(b"expect")
            self.client.queue(self._CONTINUE)

    def intercept(self) -> socket.socket | bool:
        leaf = os.path.join(self.flags.ca_cert_dir, LEAF_CERT_NAME)
        try:
            # Flushes "200 Connection established" first, then the server-side handshake.
            self.client.wrap(self.flags.ca_signing_key_file, leaf)
        except (OSError, ValueError):  # the client gave up or refused our CA: drop the tunnel
            return True
        for plugin in self.plugins.values():
            plugin.client._conn = self.client.connection  # noqa: SLF001 - what upstream intercept() does too
        return self.client.connection
