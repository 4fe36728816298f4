"""Whole runs on gs:// with storage faults: every stage must pass on its first attempt, nothing lost.

    .venv/bin/python bench/bench_gcs_faults.py                 # 20 seeds, ~3-6 min each on 2 busy CPU cores
    .venv/bin/python bench/bench_gcs_faults.py --seeds 1       # one seed, to size a longer run

The suite's GCS stand-in (tests/gcs_emulator.py: fake-gcs-server, TensorFlow's gs:// client
through a TLS-intercepting proxy, google-cloud-storage through a forwarder) answers a seeded share
of both clients' requests (--rate, default 3 %) with 503 (--kinds), before they reach the emulator.
Per seed: the demo archive is uploaded under the faults, then preprocess -> shard -> train (1 epoch)
-> evaluate run as their job subprocesses with TensorFlow's production retry settings
(GCS_RETRY_CONFIG_MAX_RETRIES=10), the smallest config that still makes every stage write
(TINY: 32x32x1, small_cnn; --num-images demo images). A seed passes when each stage exits 0 on
its first attempt and nothing is lost: the split manifest and every shard's sha256 equal a
fault-free local run's, the run and report markers are there, and the report scored every test
image. Prints one line per seed (faults injected, rewrites the stages logged, seconds per stage)
and writes bench/results/gcs_faults.json. Exit 1 when a seed failed.

Not part of `make test`: a seed costs minutes (each gs:// request takes ~70 ms through the proxy).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the GCS stand-in and the tiny config live with the tests

RESULTS = Path(__file__).resolve().parent / "results" / "gcs_faults.json"
STAGES = (("preprocess", 600), ("shard", 600), ("train", 900), ("evaluate", 600))
PRODUCTION_RETRIES = {"GCS_RETRY_CONFIG_MAX_RETRIES": "10"}
# What the stages log when a check found a stored file short, empty or different and wrote it again.
REWRITE_EVENTS = ("stored file differs from what was written",
                  "interim images differ from what was written",
                  "shards stored with another size than written",
                  "shard incomplete or corrupted")


def stage_args(root: str, archive: str, run_id: str) -> list[str]:
    from test_train import TINY

    return [f"data.root={root}", f"data.archive={archive}", f"train.run_id={run_id}", *TINY,
            "train.epochs=1", "train.warmup_epochs=0"]


def run_stage(name: str, args: list[str], env: dict[str, str], timeout_s: int) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "jobs" / f"{name}.py")]
    for item in args:
        argv += ["--set", item]
    return subprocess.run(argv, env={**env, **PRODUCTION_RETRIES, "LOG_FORMAT": "json"}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)


def rewrites(output: str, attempts: dict[str, int]) -> collections.Counter[str]:
    """How often each rewrite message was logged (JSON lines); `attempts` gets, per file that
    storage.write_bytes or copy_from_local wrote again, the last write that was found to differ."""
    found: collections.Counter[str] = collections.Counter()
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        for text in REWRITE_EVENTS:
            if event.get("event", "").startswith(text):
                found[text] += 1
        if event.get("event", "").startswith(REWRITE_EVENTS[0]):
            attempts[event["path"]] = max(attempts.get(event["path"], 0), event["attempt"])
    return found


def shard_checksums(processed_dir: str) -> dict[str, str]:
    from pneumonia import storage

    marker = storage.read_json(storage.join(processed_dir, "_SUCCESS.json"))
    return {entry["name"]: entry["sha256"] for entry in marker["shards"]}


def lost(root: str, reference: Path, run_id: str) -> list[str]:
    """What the faulted run lost or changed against the fault-free reference; [] when nothing."""
    from pneumonia import storage
    from pneumonia.layout import MARKER_NAME

    problems = []
    if storage.read_bytes(f"{root}/splits/split.json") != (reference / "splits" / "split.json").read_bytes():
        problems.append("split.json differs from the fault-free run's")
    processed = "processed/32x32x1"
    if shard_checksums(f"{root}/{processed}") != shard_checksums(str(reference / processed)):
        problems.append("shard checksums differ from the fault-free run's")
    for marker in (f"{root}/runs/{run_id}/{MARKER_NAME}", f"{root}/runs/{run_id}/report/{MARKER_NAME}"):
        if not storage.exists(marker):
            problems.append(f"{marker} is missing")
    manifest = storage.read_json(f"{root}/splits/split.json")
    scored = storage.read_json(f"{root}/runs/{run_id}/report/metrics.json")["num_images"]
    if scored != sum(manifest["counts"]["test"].values()):
        problems.append(f"the report scored {scored} test images, the split has {sum(manifest['counts']['test'].values())}")
    return problems


def one_seed(emulator, seed: int, args: argparse.Namespace, archive: str, reference: Path) -> dict:  # noqa: ANN001
    from pneumonia import storage

    root = f"gs://{emulator.bucket}/seed-{seed}"
    run_id = f"faults-{seed}"
    result = {"seed": seed, "passed": True, "seconds": {}, "rewrites": collections.Counter(), "failed": None,
              "writes_that_differed": {}}
    env = {**os.environ, **emulator.env}
    with emulator.faults(seed=seed, rate=args.rate, kinds=dict.fromkeys(args.kinds, 1.0)) as counts:
        storage.upload_file(archive, f"{root}/raw/demo.zip")  # as the launcher does, faults included
        for name, timeout_s in STAGES:
            started = time.monotonic()
            done = run_stage(name, stage_args(root, f"{root}/raw/demo.zip", run_id), env, timeout_s)
            result["seconds"][name] = round(time.monotonic() - started)
            result["rewrites"].update(rewrites(done.stdout + done.stderr, result["writes_that_differed"]))
            if done.returncode != 0:
                result.update(passed=False, failed=f"{name} exited {done.returncode} on its first attempt: "
                                                   f"{done.stderr[-2000:]}")
                break
    result["faults"] = dict(counts)
    if result["passed"]:
        result["lost"] = lost(root, reference, run_id)
        result["passed"] = not result["lost"]
    result["rewrites"] = dict(result["rewrites"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds (runs), one after another")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.03, help="share of each client's requests that fail")
    parser.add_argument("--kinds", nargs="+", default=["503"], choices=["503", "429", "reset"])
    parser.add_argument("--num-images", type=int, default=48, help="demo images (the fewer, the faster)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    # Before TensorFlow is imported (the tests' conftest does the same): no GCE probe, a fixed token.
    os.environ.setdefault("NO_GCE_CHECK", "true")
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test-token")
    from gcs_emulator import GcsEmulator

    from pneumonia.config import load_config
    from pneumonia.data import preprocess, shard
    from pneumonia.data.demo import make_demo_archive

    work = Path(tempfile.mkdtemp(prefix="bench-gcs-faults-"))
    archive = make_demo_archive(str(work / "demo.zip"), num_images=args.num_images, seed=0)
    reference = work / "reference"
    config = load_config(None, stage_args(str(reference), archive, "reference"))
    preprocess.run(config)  # fault-free and local: what every faulted run must store on gs://
    shard.run(config)

    emulator = GcsEmulator(work / "emulator").start()
    os.environ.update(emulator.env)  # this process uploads the archive with google-cloud-storage
    results = []
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            result = one_seed(emulator, seed, args, archive, reference)
            results.append(result)
            print(f"seed {seed}: {'passed' if result['passed'] else 'FAILED'}  faults {result['faults']}  "
                  f"rewrites {result['rewrites']}  seconds {result['seconds']}  "
                  f"writes that differed, by file: {result['writes_that_differed']}"
                  + (f"\n  {result['failed'] or result['lost']}" if not result["passed"] else ""), flush=True)
    finally:
        emulator.stop()
    passed = sum(result["passed"] for result in results)
    total_rewrites = sum(sum(result["rewrites"].values()) for result in results)
    total_faults = sum(sum(result["faults"].values()) for result in results)
    most = max((n for result in results for n in result["writes_that_differed"].values()), default=0)
    print(f"{passed}/{len(results)} seeds passed on every stage's first attempt with nothing lost; "
          f"{total_faults} faults injected, {total_rewrites} rewrites; the most writes of one file that "
          f"differed: {most} (of storage.WRITE_ATTEMPTS)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rate": args.rate, "kinds": args.kinds, "num_images": args.num_images,
                                    "passed": passed, "seeds": results}, indent=2) + "\n")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
