"""Runs N training workers on this machine, on loopback with TF_CONFIG: the cluster's code path locally.

    python -m pneumonia.training.local_workers --workers 2 -- --config jobs/configs/demo.yaml

Each worker is `jobs/train.py <train args>` with its own TF_CONFIG (free 127.0.0.1 ports). Their
logs go to this process's stderr, each line carrying its `worker` field. If one worker fails, the
others are killed (their collectives would fail or hang anyway) and this exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pneumonia.config import new_run_id
from pneumonia.errors import EXIT_FAILURE
from pneumonia.logs import configure_logging, get_logger

log = get_logger(__name__)

TRAIN_ENTRYPOINT = Path(__file__).resolve().parents[3] / "jobs" / "train.py"
POLL_S = 0.2
KILL_GRACE_S = 10.0


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out now; they are held open together so that they differ."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def loopback_tf_configs(num_workers: int, ports: Sequence[int] | None = None) -> list[dict]:
    ports = list(ports or free_ports(num_workers))
    workers = [f"127.0.0.1:{port}" for port in ports]
    return [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}} for i in range(num_workers)]


def with_run_id(train_args: Sequence[str]) -> list[str]:
    """Every worker must write the same run: fix one run id here unless the caller gave one."""
    args = list(train_args)
    if any(arg.startswith("train.run_id=") for arg in args) or any(
            a == "--set" and b.startswith("train.run_id=") for a, b in zip(args, args[1:], strict=False)):
        return args
    return [*args, "--set", f"train.run_id={new_run_id()}"]


def visible_gpus(env: dict[str, str]) -> list[str]:
    """The GPU ids this machine offers the workers: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list.

    Asked without importing TensorFlow, which would claim the GPUs in this supervising process.
    """
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [gpu.strip() for gpu in env["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
        return [] if ids[:1] == ["-1"] else ids
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # no driver, no GPU
    return [line.strip() for line in listing.splitlines() if line.strip()]


def gpus_per_worker(num_workers: int, gpus: Sequence[str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each worker, or None to leave it alone (no GPU).

    One GPU each when there are enough. With fewer GPUs than workers every worker trains on the
    CPU: two TensorFlow processes on one GPU each take its memory and NCCL refuses a GPU twice in
    one collective, and a mix of GPU and CPU workers cannot agree on a collective implementation.
    """
    if not gpus:
        return None
    if len(gpus) >= num_workers:
        return list(gpus[:num_workers])
    return ["-1"] * num_workers


def launch(num_workers: int, train_args: Sequence[str], *, env: dict[str, str] | None = None,
           entrypoint: Path = TRAIN_ENTRYPOINT) -> list[subprocess.Popen]:
    base = dict(os.environ if env is None else env)
    gpus = visible_gpus(base)
    assigned = gpus_per_worker(num_workers, gpus)
    if assigned and assigned[0] == "-1":
        log.warning("fewer GPUs than workers: every worker trains on the CPU (use as many workers as GPUs, or "
                    "one worker, to train on them)", num_gpus=len(gpus), num_workers=num_workers)
    processes = []
    for index, tf_config in enumerate(loopback_tf_configs(num_workers)):
        worker_env = {**base, "TF_CONFIG": json.dumps(tf_config)}
        if assigned:
            worker_env["CUDA_VISIBLE_DEVICES"] = assigned[index]
        worker_env.pop("JOB_COMPLETION_INDEX", None)
        processes.append(subprocess.Popen([sys.executable, str(entrypoint), *train_args], env=worker_env))
    return processes


def supervise(processes: Sequence[subprocess.Popen], timeout_s: float | None = None) -> int:
    """Waits for all; the first failure kills the rest. Returns 0 or the first failing exit code."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while True:
        codes = [process.poll() for process in processes]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            index, code = failed[0]
            log.error("worker failed; stopping the others", worker_failed=index, exit_code=code)
            stop(processes)
            return code
        if all(code == 0 for code in codes):
            return 0
        if deadline and time.monotonic() > deadline:
            log.error("workers ran past the timeout; stopping them", timeout_s=timeout_s)
            stop(processes)
            return EXIT_FAILURE
        time.sleep(POLL_S)


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM (workers save their backup if they can), then SIGKILL after a grace period."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.training.local_workers",
                                     description="Run N training workers on loopback (MultiWorkerMirroredStrategy).")
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes (>= 1)")
    parser.add_argument("--timeout-s", type=float, default=0, help="kill all workers after this long (0: no limit)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of jobs/train.py")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    configure_logging("train-launcher", run_id="-", worker="launcher")
    if args.workers < 1:
        log.error("bad argument", error="--workers must be >= 1")
        return 2
    train_args = with_run_id(train_args)
    processes = launch(args.workers, train_args)
    log.info("workers started", num_workers=args.workers, pids=[p.pid for p in processes])
    previous = signal.signal(signal.SIGTERM, lambda *_: stop(processes))
    try:
        return supervise(processes, args.timeout_s or None)
    except KeyboardInterrupt:
        stop(processes)
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
