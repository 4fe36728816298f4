"""`python -m pneumonia.k8s run|status|logs|delete`: the pipeline on a Kubernetes cluster (`make train-cluster`).

    python -m pneumonia.k8s run --bucket gs://my-bucket/pneumonia \
        --image europe-west4-docker.pkg.dev/my-project/pneumonia/pneumonia:0.1.0 --workers 2 --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from kubernetes.client.exceptions import ApiException

from pneumonia.config import load_config, new_run_id
from pneumonia.errors import EXIT_BAD_INPUT, BadInputError
from pneumonia.k8s import client as kc
from pneumonia.k8s import launcher as ln
from pneumonia.k8s import logs as lg
from pneumonia.k8s import manifests as mf
from pneumonia.k8s import status as st
from pneumonia.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.k8s",
                                     description="Run the pneumonia pipeline as Kubernetes Jobs and follow it.")
    commands = parser.add_subparsers(dest="command", required=True)

    def cluster_args(sub: argparse.ArgumentParser, follows: bool = False) -> None:
        sub.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
        sub.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
        sub.add_argument("--namespace", default=None, help="namespace (default: cluster.namespace of the config)")
        if follows:  # only run and logs keep polling
            sub.add_argument("--poll-s", type=float, default=10.0, help="seconds between status polls")
            sub.add_argument("--timeout-s", type=float, default=None,
                             help="stop following after this long (default: a stage's activeDeadlineSeconds + 10 min)")

    run = commands.add_parser("run", help="apply the manifests, create the stage Jobs in order, follow them")
    cluster_args(run, follows=True)
    run.add_argument("--config", default=str(mf.CLUSTER_CONFIG), help="pipeline config (default: %(default)s)")
    run.add_argument("--manifests", default=str(mf.MANIFEST_DIR), help="manifest folder (default: %(default)s)")
    run.add_argument("--image", help="pinned container image (tag or digest, never :latest)")
    run.add_argument("--bucket", help="gs://bucket[/prefix]: data.root of the run")
    run.add_argument("--workers", type=int, help="training workers (pods of the train Indexed Job)")
    run.add_argument("--gpus-per-worker", type=int, help="GPUs per training worker (0: CPU-only training)")
    run.add_argument("--gpu-type", help="GKE accelerator of the GPU node pool, e.g. nvidia-l4, nvidia-tesla-t4")
    run.add_argument("--queue", dest="queue_name", metavar="LOCALQUEUE",
                     help="admit every Job through this Kueue LocalQueue (cluster.queue_name; see "
                          "docs/gpus-on-gke.md): created suspended, started when quota for all its pods is there")
    run.add_argument("--run-id", help="run id shared by train and evaluate (default: a new one; reuse one to resume)")
    run.add_argument("--archive", help="the dataset zip: a local file (uploaded to <bucket>/raw/) or a gs:// URL")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override any config key; repeatable")
    run.add_argument("--setup", action="store_true",
                     help="also create the namespace, ServiceAccount, Role and RoleBinding (needs RBAC rights)")
    run.add_argument("--gsa", metavar="EMAIL",
                     help="with --setup: the Google service account the pods act as (Workload Identity), e.g. "
                          "pneumonia-pipeline@my-project.iam.gserviceaccount.com")
    run.add_argument("--dry-run", action="store_true", help="print the exact YAML and create nothing")

    status = commands.add_parser("status", help="the state of a run's Jobs (or of every run)")
    cluster_args(status)
    status.add_argument("--run-id", help="the run (default: list every run in the namespace)")

    logs = commands.add_parser("logs", help="a stage pod's log (default: the train chief, index 0)")
    cluster_args(logs, follows=True)
    logs.add_argument("--run-id", required=True)
    logs.add_argument("--stage", default="train", choices=mf.STAGES)
    logs.add_argument("--index", type=int, default=0, help="pod index of an Indexed Job (train 0 is the chief)")
    logs.add_argument("--tail", type=int, default=200, help="lines from the end (default: %(default)s)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the pod ends")

    delete = commands.add_parser("delete", help="delete a run's Jobs and their pods (outputs stay in the bucket)")
    cluster_args(delete)
    delete.add_argument("--run-id", required=True)
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    configure_logging("launcher", run_id=getattr(args, "run_id", None) or "-")
    try:
        if args.command == "run":
            return _run(args, out)
        namespace = args.namespace or load_config(mf.CLUSTER_CONFIG).cluster.namespace
        client = kc.KubeClient(args.kubeconfig, args.context, namespace)
        if args.command == "status":
            return st.show_status(client, args.run_id, out)
        if args.command == "logs":
            options = st.FollowOptions(poll_s=args.poll_s, timeout_s=args.timeout_s)
            return lg.show_logs(client, args.run_id, args.stage, args.index, args.tail, args.follow, options, out)
        if not args.yes and not ln._ask(f"Delete the Jobs of run {args.run_id} (and their pods)? [y/N] "):
            return ln.EXIT_OK
        ln.delete_run(client, args.run_id, lambda text: print(text, file=out))
        return ln.EXIT_OK
    except (BadInputError, kc.LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_BAD_INPUT)
    except ApiException as error:
        print(f"error: {kc.api_error(error)}", file=sys.stderr)
        return ln.EXIT_FAILURE
    except KeyboardInterrupt:
        return ln.EXIT_INTERRUPTED


def _run(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config, args.overrides)
    archive_local = None
    archive_url = None
    if args.archive:
        if args.archive.startswith("gs://"):
            archive_url = args.archive
        else:
            if not os.path.isfile(args.archive):
                raise BadInputError(f"--archive {args.archive} is not a file: pass a local zip or a gs:// URL")
            archive_local = args.archive
    config = mf.with_launch_options(
        config, bucket=args.bucket, image=args.image, namespace=args.namespace, num_workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, gpu_type=args.gpu_type, run_id=args.run_id or new_run_id(),
        queue_name=args.queue_name)
    if archive_local:
        archive_url = f"{config.data.root}/raw/{os.path.basename(archive_local)}"
    if archive_url:
        config = mf.with_launch_options(config, archive=archive_url)
    mf.check_launchable(config)
    objects = mf.without_upstream_waits(
        mf.build_manifests(mf.load_manifests(args.manifests), config, managed_by="pneumonia-k8s"))
    if args.gsa:
        if not args.setup:
            raise BadInputError("--gsa sets the ServiceAccount, which only --setup applies: add --setup")
        objects = mf.with_gcp_service_account(objects, args.gsa)
    if args.setup:
        mf.check_gcp_service_account(objects)
    if args.dry_run:
        shown = [obj for obj in objects if args.setup or obj["kind"] not in mf.SETUP_KINDS]
        out.write(mf.to_yaml(shown))
        if archive_local:
            print(f"dry run: would upload {archive_local} to {archive_url}", file=sys.stderr)
        print(f"dry run: nothing created (run id {config.train.run_id})", file=sys.stderr)
        return ln.EXIT_OK
    client = kc.KubeClient(args.kubeconfig, args.context, config.cluster.namespace)
    options = st.FollowOptions(poll_s=args.poll_s, timeout_s=args.timeout_s)
    launcher = ln.Launcher(client, objects, config, options, out)
    print(f"run {config.train.run_id}: {config.cluster.num_workers} worker(s) x {config.cluster.gpus_per_worker} "
          f"{config.cluster.gpu_type if config.cluster.gpus_per_worker else 'CPU only'}, data {config.data.root}, "
          f"namespace {config.cluster.namespace}", file=out, flush=True)
    return launcher.run(setup=args.setup, archive=archive_local, upload=_upload if archive_local else None)


def _upload(local_path: str, url: str) -> None:
    from pneumonia import storage

    uploaded = storage.upload_file(local_path, url, progress=_progress_bar())
    print("" if uploaded else f"{url} already holds the same bytes; not uploaded again", file=sys.stderr)


def _progress_bar():  # noqa: ANN202 - a closure for storage.upload_file
    shown = {"percent": -1}

    def report(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        if percent != shown["percent"]:
            shown["percent"] = percent
            bar = "#" * (percent // 4)
            print(f"\rupload [{bar:<25}] {percent:3d}% {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB",
                  end="", file=sys.stderr, flush=True)

    return report


if __name__ == "__main__":
    sys.exit(main())
