"""`make image-test`: build the project's image and run every stage in it the way the manifests' pods run it.

1. Stand-in base: a minimal Debian 12 (Python 3.11 + pip) made with mmdebstrap and `podman import`ed,
   in place of tensorflow/tensorflow (no registry needed). It checks the Dockerfile and the pod
   constraints, not the real base's contents or GPUs.
2. The Dockerfile built on it; rebuilt for another revision, which must reuse every layer; the
   base.name label must name the base.
3. The stages in that image with the pod settings read from manifests/ (tests/image/pods.py), the
   config mounted read-only as the ConfigMap is, a host folder as the data root in place of the
   bucket, no network but the training workers' own: demo archive, a negative control, preprocess,
   shard (two indexed pods), train (two workers, SIGTERM to one after the first epoch: 143 with
   the backup saved; the replacement pods resume from it), evaluate.

Needs root (or a working rootless podman), podman, runc and mmdebstrap; installs them with apt when
missing and root. Not collected by pytest (its pure parts are tested in tests/test_image_pods.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This checkout's code, manifests and Dockerfile, whichever checkout .venv was installed from.
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(Path(__file__).parent), str(REPO / "src")]
import pods  # noqa: E402

from pneumonia import errors  # noqa: E402
from pneumonia.k8s import manifests as mf  # noqa: E402

WORK = REPO / "build" / "image-test"
LOGS = WORK / "logs"
BASE = "localhost/pneumonia-base:image-test"
IMAGE = "localhost/pneumonia:image-test"
REBUILT = "localhost/pneumonia:image-test-rebuild"
NETWORK = "pneumonia-image-test"
# Where the pods see the data root; on the cluster it is gs://BUCKET/pneumonia (there is no GCS here).
DATA_IN_POD = "/bucket/pneumonia"
RUN_ID = "image-test"
DEMO_IMAGES = 300
# command -> the Debian package that has it
TOOLS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap"}
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
# Where Debian keeps a machine's own CAs (a TLS-intercepting proxy's, as on the CI machine).
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
STAGE_TIMEOUT_S = 600
LABEL_BASE = "org.opencontainers.image.base.name"


class ImageTestError(Exception):
    """A step failed; the message says which and where its log is."""


class Summary:
    """One entry per step: its exit code(s) and wall time, printed as one line at the end."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.started = time.monotonic()

    def add(self, step: str, codes: str, seconds: float) -> None:
        self.entries.append(f"{step} {codes} {seconds:.0f}s")
        print(f"image-test: {step}: {codes} in {seconds:.0f}s", flush=True)

    def line(self, outcome: str) -> str:
        total = time.monotonic() - self.started
        return f"image-test {outcome}: " + " | ".join([*self.entries, f"total {total:.0f}s"])


def run(command: list[str], log: Path | None = None, timeout: float = STAGE_TIMEOUT_S, **kwargs) -> int:
    """Runs a command to completion; its output goes to `log` (or ours). Returns the exit code."""
    if log is None:
        return subprocess.run(command, timeout=timeout, check=False, **kwargs).returncode
    with log.open("w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False,
                              **kwargs).returncode


def output(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout.strip()


def log_tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def timed(summary: Summary, step: str, action: Callable[[], int], log: Path) -> None:
    started = time.monotonic()
    code = action()
    summary.add(step, str(code), time.monotonic() - started)
    if code != 0:
        raise ImageTestError(f"{step} exited {code}; last lines of {log}:\n{log_tail(log)}")


# --- the machine ------------------------------------------------------------------------------

def ensure_tools() -> None:
    """Installs podman, runc and mmdebstrap with apt when missing and root; otherwise says what to install."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    packages = [TOOLS[tool] for tool in missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ImageTestError(f"missing {', '.join(missing)}: install them as root, e.g. "
                             f"`apt-get install --no-install-recommends {' '.join(packages)}` (Debian 12 / Ubuntu), "
                             "then run `make image-test` again")
    print(f"image-test: installing {' '.join(packages)} with apt", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        if run(command, LOGS / "apt.log", env=env) != 0:
            raise ImageTestError(f"`{' '.join(command)}` failed; see {LOGS / 'apt.log'}:\n{log_tail(LOGS / 'apt.log')}")


def _ulimit_settings() -> list[str]:
    def hard_limit(kind: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return 1048576 if hard == resource.RLIM_INFINITY else hard

    nofile = hard_limit(resource.RLIMIT_NOFILE)
    # Measured: conmon runs with nproc 32768 whatever this process has, and anything higher is refused.
    nproc = min(hard_limit(resource.RLIMIT_NPROC), 32768)
    return [
        "[containers]",
        "# podman asks for rlimits above what it may grant here (nofile 1048576); without",
        "# CAP_SYS_RESOURCE (a machine that is itself a container) runc is refused with",
        "# `error setting rlimit type 7: operation not permitted`. Ask for what we have.",
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]',
    ]


_ENGINE_SETTINGS = [
    "[engine]",
    "# crun 1.8 (Debian 12) refuses the hybrid cgroup v1/v2 layout of such machines (issue 12); runc",
    "# runs there. Without systemd as init, cgroups are managed directly and events go to a file.",
    'runtime = "runc"',
    'cgroup_manager = "cgroupfs"',
    'events_logger = "file"',
]


def configure_podman() -> str:
    """Podman as the machine has it if a container starts; else a containers.conf for this test only
    (CONTAINERS_CONF), with the fewest settings that let one start. Returns what was set, for the log."""
    probe = ["podman", "run", "--rm", "--network", "none", BASE, "true"]
    attempts = [("none", None), ("ulimits", _ulimit_settings()), ("ulimits+runc", [*_ulimit_settings(), *_ENGINE_SETTINGS])]
    failures = []
    for name, settings in attempts:
        if settings is not None:
            conf = WORK / "containers.conf"
            conf.write_text("# Written by tests/image/run.py for the image test only (CONTAINERS_CONF).\n"
                            + "\n".join(settings) + "\n")
            os.environ["CONTAINERS_CONF"] = str(conf)
        result = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode == 0:
            return name
        failures.append(f"{name}: {result.stderr.strip()}")
    raise ImageTestError("no container starts on this machine, even with the set-up in "
                         f"{WORK / 'containers.conf'}:\n" + "\n".join(failures))


# --- the images ---------------------------------------------------------------------------------

def build_base() -> int:
    """A minimal Debian 12 with python -> python3, pip allowed into the system interpreter, and the
    machine's extra CAs trusted (pip reaches PyPI through a TLS-intercepting proxy on the CI machine)."""
    hooks = ['chroot "$1" ln -sf python3 /usr/bin/python',
             'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED']
    if EXTRA_CA_DIR.is_dir() and any(EXTRA_CA_DIR.iterdir()):
        hooks += [f"copy-in {EXTRA_CA_DIR} {EXTRA_CA_DIR.parent}", 'chroot "$1" update-ca-certificates']
    command = ["mmdebstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates",
               *[f"--customize-hook={hook}" for hook in hooks], DEBIAN_SUITE, "-", DEBIAN_MIRROR]
    log = LOGS / "base.log"
    with log.open("w") as out:
        rootfs = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out)
        imported = subprocess.run(["podman", "import", "-", BASE], stdin=rootfs.stdout, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=STAGE_TIMEOUT_S, check=False)
        rootfs.stdout.close()
        return rootfs.wait(timeout=60) or imported.returncode


def build_image(tag: str, revision: str, log: Path) -> int:
    return run(["podman", "build", "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", "VERSION=image-test",
                "--build-arg", f"REVISION={revision}", "--tag", tag, str(REPO)], log, timeout=1800)


def inspect(image: str) -> dict:
    return json.loads(output(["podman", "image", "inspect", image]))[0]


def check_image_cache_and_labels(summary: Summary, revision: str) -> None:
    """The Dockerfile bugs of issue 12 stay fixed: a new revision reuses every layer (the dependency
    layer above all), and the base.name label names the base."""
    log = LOGS / "rebuild.log"
    timed(summary, "rebuild", lambda: build_image(REBUILT, f"{revision}-next", log), log)
    first, second = inspect(IMAGE), inspect(REBUILT)
    run(["podman", "rmi", REBUILT], LOGS / "rmi.log", timeout=120)
    if first["RootFS"]["Layers"] != second["RootFS"]["Layers"]:
        raise ImageTestError(f"a rebuild for a new REVISION rebuilt layers (a per-commit ARG/LABEL before a RUN?); see {log}")
    # Not checked: the rebuild's revision label. podman 4.3's buildah (1.28) reuses a cached LABEL
    # step when only the build-arg value behind it changed, so it keeps the first build's revision;
    # docker build, which `make image` uses, writes the new one.
    base_label = (first["Labels"] or {}).get(LABEL_BASE)
    if base_label != BASE:
        raise ImageTestError(f"label {LABEL_BASE} = {base_label!r}, expected {BASE!r} (ARG BASE_IMAGE after FROM?)")
    print(f"image-test: rebuild for a new revision reused all {len(first['RootFS']['Layers'])} layers; "
          f"{LABEL_BASE}={base_label}", flush=True)


# --- the pods -----------------------------------------------------------------------------------

def start(pod: pods.Pod) -> subprocess.Popen:
    subprocess.run(["podman", "rm", "--force", "--ignore", pod.name], capture_output=True, timeout=120, check=False)
    log = (LOGS / f"{pod.name}.log").open("w")
    return subprocess.Popen(pod.command(IMAGE), stdout=log, stderr=subprocess.STDOUT)


def wait_all(started: dict[str, subprocess.Popen], timeout: float = STAGE_TIMEOUT_S) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    for name, process in started.items():
        try:
            codes[name] = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            subprocess.run(["podman", "kill", name], capture_output=True, timeout=60, check=False)
            codes[name] = process.wait(timeout=60)
    return codes


def run_pods(summary: Summary, step: str, stage_pods: list[pods.Pod], expect: Callable[[dict[str, int]], bool]
             = lambda codes: not any(codes.values())) -> dict[str, int]:
    started_at = time.monotonic()
    codes = wait_all({pod.name: start(pod) for pod in stage_pods})
    summary.add(step, ",".join(str(code) for code in codes.values()), time.monotonic() - started_at)
    if not expect(codes):
        tails = "\n".join(f"--- {name} (exit {code}), {LOGS / name}.log:\n{log_tail(LOGS / f'{name}.log')}"
                          for name, code in codes.items())
        raise ImageTestError(f"{step}: unexpected exit codes {codes}\n{tails}")
    return codes


def write_configmap(objects: list[dict], folder: Path) -> Path:
    """The ConfigMap's config.yaml as a file in `folder`, which the pods mount read-only."""
    (configmap,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / mf.CONFIG_MAP_KEY).write_text(configmap["data"][mf.CONFIG_MAP_KEY])
    return folder


def pipeline_objects(run_id: str, **train: object) -> list[dict]:
    """manifests/ patched as the launcher patches them, for a demo-sized config."""
    config = pods.image_test_config((REPO / "jobs/configs/cluster.yaml").read_text(),
                                    (REPO / "jobs/configs/demo.yaml").read_text(),
                                    data_root=DATA_IN_POD, run_id=run_id, **train)
    return mf.build_manifests(mf.load_manifests(REPO / "manifests"), config)


def worker_network(train_job: dict) -> list[tuple[str, ...]]:
    """A network of their own for the training workers (nothing else on it, no way out), on which
    worker i answers to <job>-<i>.<service> as on the cluster."""
    subprocess.run(["podman", "network", "rm", "--force", NETWORK], capture_output=True, timeout=120, check=False)
    output(["podman", "network", "create", "--internal", NETWORK])
    subnet = ipaddress.ip_network(output(["podman", "network", "inspect", NETWORK, "--format",
                                          "{{range .Subnets}}{{.Subnet}}{{end}}"]))
    num_workers = train_job["spec"]["completions"]
    addresses = [str(host) for host in list(subnet.hosts())[10:10 + num_workers]]
    hosts = pods.worker_hosts(train_job, addresses)
    return [("--network", NETWORK, "--ip", address, *hosts) for address in addresses]


def train_pods(objects: list[dict], config_dir: Path, data_root: tuple[str, str]) -> list[pods.Pod]:
    train_job = mf.stage_jobs(objects)["train"]
    networks = worker_network(train_job)
    return [pods.stage_pod(train_job, config_dir=str(config_dir), data_root=data_root, index=i, network=network)
            for i, network in enumerate(networks)]


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def log_events(log: Path, event: str) -> list[dict]:
    """The stage's JSON log lines (structlog, one event per line) with this event name."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                events.append(record)
    return events


def train_with_a_preemption(summary: Summary, objects: list[dict], config_dir: Path,
                            data_root: tuple[str, str]) -> None:
    """Training as the Job runs it through a preemption: SIGTERM to worker 0 once epoch 0 is backed up;
    it must save its backup and exit 143, and its peer must stop too (143, or the peer-lost code where
    errors.py has one) within the grace period. The Job then replaces the pods without counting a
    failure (podFailurePolicy: Ignore on 143); the replacements resume and finish, never redoing epoch 0."""
    worker_pods = train_pods(objects, config_dir, data_root)
    target = worker_pods[0]
    log = LOGS / f"{target.name}.log"
    started_at = time.monotonic()
    started = {pod.name: start(pod) for pod in worker_pods}
    if not wait_for_line(log, '"backup saved"', started[target.name], timeout=STAGE_TIMEOUT_S):
        wait_all(started, timeout=5)
        raise ImageTestError(f"train: {target.name} never saved an epoch's backup; {log}:\n{log_tail(log)}")
    subprocess.run(["podman", "kill", "--signal", "TERM", target.name], capture_output=True, timeout=60, check=True)
    # The kubelet's SIGKILL after the grace period is wait_all's kill after the timeout.
    codes = wait_all(started, timeout=target.grace_period_s)
    summary.add("train(SIGTERM to worker 0)", ",".join(str(code) for code in codes.values()),
                time.monotonic() - started_at)
    peer_codes = {errors.EXIT_PREEMPTED, getattr(errors, "EXIT_PEER_LOST", errors.EXIT_PREEMPTED)}
    backup = Path(data_root[0]) / "runs" / RUN_ID / "backup"  # Layout.backup (layout.py imports TF)
    problems = []
    if codes[target.name] != errors.EXIT_PREEMPTED:
        problems.append(f"{target.name} exited {codes[target.name]}, not {errors.EXIT_PREEMPTED}")
    if not log_events(log, "stop requested (SIGTERM): backup saved"):
        problems.append(f"{target.name} did not log saving its backup on SIGTERM")
    if not backup.is_dir() or not any(path.is_file() for path in backup.rglob("*")):
        problems.append(f"no backup under {backup}")
    problems += [f"{name} exited {code}, expected one of {sorted(peer_codes)}"
                 for name, code in codes.items() if name != target.name and code not in peer_codes]
    if problems:
        raise ImageTestError("train: " + "; ".join(problems) + f"\n{log}:\n{log_tail(log)}")
    for pod in worker_pods:  # keep the first attempt's logs next to the replacements'
        (LOGS / f"{pod.name}.log").replace(LOGS / f"{pod.name}.attempt-1.log")
    run_pods(summary, "train(replacement pods)", train_pods(objects, config_dir, data_root))
    redone = [event for event in log_events(log, "epoch begin") if event.get("epoch") == 0]
    if redone:
        raise ImageTestError(f"train: the replacement pods started again from epoch 0 instead of the backup; see {log}")


def run_stages(summary: Summary) -> None:
    data_host = WORK / "bucket"
    if data_host.exists():
        shutil.rmtree(data_host)
    data_host.mkdir(parents=True)
    data_host.chmod(0o777)  # the pods run as a non-root user, as the bucket's writer
    data_root = (str(data_host), DATA_IN_POD)
    # Two epochs: one backed up before the SIGTERM, one for the replacement pods to do.
    objects = pipeline_objects(RUN_ID, epochs=2)
    config_dir = write_configmap(objects, WORK / "configmap")
    jobs = mf.stage_jobs(objects)

    def one(stage: str, index: int | None = None, **options: object) -> pods.Pod:
        return pods.stage_pod(jobs[stage], config_dir=str(config_dir), data_root=data_root, index=index, **options)

    archive = f"{DATA_IN_POD}/raw/demo-chest-xray.zip"
    run_pods(summary, "demo-archive", [one("preprocess", name="pneumonia-demo-archive", args=[
        "-m", "pneumonia.data.demo", "--out", archive, "--num-images", str(DEMO_IMAGES)])])
    # Negative control: without its writable emptyDir on /tmp the stage has nowhere to write (the
    # root filesystem is read-only) and must fail for that reason; if it passed, the pod's
    # constraints would not be applied.
    control = one("preprocess", name="pneumonia-preprocess-no-tmp", drop_mounts=("/tmp",))
    run_pods(summary, "preprocess-without-tmp(must fail)", [control], expect=lambda codes: (
        codes[control.name] not in (0, 125, 126, 127)
        and any(reason in (LOGS / f"{control.name}.log").read_text(errors="replace")
                for reason in ("No usable temporary directory", "Read-only file system"))))
    run_pods(summary, "preprocess", [one("preprocess")])
    num_shard_pods = jobs["shard"]["spec"]["completions"]
    run_pods(summary, "shard", [one("shard", index=i) for i in range(num_shard_pods)])
    train_with_a_preemption(summary, objects, config_dir, data_root)
    run_pods(summary, "evaluate", [one("evaluate")])
    report_marker = data_host / "runs" / RUN_ID / "report" / "_SUCCESS.json"  # Layout.report_marker
    if not report_marker.is_file():
        raise ImageTestError(f"evaluate exited 0 but wrote no {report_marker}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="rebuild the stand-in base and the image from scratch")
    parser.add_argument("--build-only", action="store_true",
                        help=f"only build {IMAGE} (what the cluster test bed runs), without the checks and stages")
    args = parser.parse_args(argv)
    LOGS.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    outcome = "FAILED"
    try:
        ensure_tools()
        if args.fresh:
            for image in (IMAGE, REBUILT, BASE):
                run(["podman", "rmi", "--force", image], LOGS / "rmi.log", timeout=300)
            run(["podman", "image", "prune", "--force"], LOGS / "rmi.log", timeout=300)
        if subprocess.run(["podman", "image", "exists", BASE], timeout=60, check=False).returncode == 0:
            summary.add("base(cached)", "0", 0)
        else:
            timed(summary, "base", build_base, LOGS / "base.log")
        print(f"image-test: podman set-up: {configure_podman()}", flush=True)
        revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=60, check=False).stdout.strip() or "unknown"
        timed(summary, "build", lambda: build_image(IMAGE, revision, LOGS / "build.log"), LOGS / "build.log")
        if not args.build_only:
            check_image_cache_and_labels(summary, revision)
            run_stages(summary)
        outcome = "passed"
    except (ImageTestError, subprocess.SubprocessError, OSError) as error:
        print(f"image-test: {error}", file=sys.stderr, flush=True)
    finally:
        if shutil.which("podman"):
            subprocess.run(["podman", "network", "rm", "--force", NETWORK], capture_output=True, timeout=120,
                           check=False)
        print(summary.line(outcome), flush=True)
    return 0 if outcome == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
