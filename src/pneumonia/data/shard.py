"""The shard stage: interim/ images + split manifest -> resized, encoded TFRecord shards and a marker.

Run N writers with `--set shard.num_workers=N --set shard.index=i` (i = 0..N-1; in an Indexed Job
index -1 takes JOB_COMPLETION_INDEX). Each writes its share of the shards; whichever finds them
all complete runs the round-trip check and writes processed/<H>x<W>x<C>/_SUCCESS.json last.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from pneumonia import cluster, progress, storage
from pneumonia.config import CLASS_NAMES, SHARDS, PipelineConfig, settings_deciding
from pneumonia.data import imaging, pipeline, roundtrip, tfrecords, upstream
from pneumonia.errors import BadInputError, StorageError
from pneumonia.layout import CONFIG_NAME, MARKER_NAME, Layout
from pneumonia.logs import get_logger

log = get_logger(__name__)

SPLITS = ("train", "val", "test")  # `unused` rows are never sharded
MARKER_VERSION = 1
POLL_S = 1.0
_UPSTREAM_POLL_S = 10.0  # as storage.wait_for: the interim marker changes once per preprocess run
# Metadata (paths, ids, framing) per record on top of the pixels; only used to size shards.
_RECORD_OVERHEAD_BYTES = 256
# TFRecord framing around each record: its length (8 bytes), the length's CRC (4), the data's CRC (4).
_TFRECORD_FRAMING_BYTES = 16
# Records the writer takes from the decode pipeline at a time (_encoded_records).
_RECORDS_PER_BATCH = 64


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its split, position and the manifest rows it holds, in write order."""

    split: str
    shard_index: int
    num_shards: int
    rows: tuple[dict[str, Any], ...]

    @property
    def name(self) -> str:
        return tfrecords.shard_name(self.split, self.shard_index, self.num_shards)


def run(config: PipelineConfig) -> dict[str, Any]:
    """The stage body (jobs/shard.py); returns the marker."""
    layout = Layout.of(config)
    wait_for_interim(layout, config)
    manifest_bytes = _read_manifest_bytes(layout.split_manifest)
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    rows = validate_manifest(manifest_bytes, layout.split_manifest)
    plans = plan_shards(rows, config)
    out_dir = layout.processed(config.shard.size_dir)
    marker_path = storage.join(out_dir, MARKER_NAME)
    fingerprint = compute_fingerprint(manifest_sha256, config)

    if storage.exists(marker_path):
        marker = storage.read_json(marker_path)
        # A marker from before split_manifest_sha256 was recorded is rewritten (its shards are kept).
        if marker.get("fingerprint") == fingerprint and marker.get("split_manifest_sha256") == manifest_sha256:
            _verify_against_marker(out_dir, marker)
            log.info("already done", marker=marker_path, num_shards=len(marker["shards"]))
            return marker
        log.warning("marker is from another manifest or shard config; redoing", marker=marker_path)
        _remove_if_stale(marker_path, fingerprint, manifest_sha256)

    index = _worker_index(config)
    num_workers = config.shard.num_workers
    mine = [plan for position, plan in enumerate(plans) if position % num_workers == index]
    log.info("sharding", out_dir=out_dir, num_shards=len(plans), my_shards=len(mine), worker_index=index,
             num_workers=num_workers, encoding=config.shard.encoding)
    started = time.monotonic()
    todo = []
    for plan in mine:
        if _is_complete(out_dir, plan, fingerprint):
            log.info("shard already complete", shard=plan.name)
        else:
            todo.append(plan)
    write_shards(out_dir, todo, config, fingerprint)
    written = sum(len(plan.rows) for plan in todo)
    elapsed = time.monotonic() - started
    log.info("my shards done", num_images=written, seconds=round(elapsed, 2),
             images_per_s=round(written / elapsed, 1) if written and elapsed else None)
    return _finish(out_dir, plans, config, fingerprint, manifest_sha256, rows, index)


# ---------------------------------------------------------------------------------------- upstream

def wait_for_interim(layout: Layout, config: PipelineConfig) -> dict[str, Any]:
    """Waits (bounded by cluster.upstream_wait_timeout_s) for an interim marker made with this config's
    split and data settings; returns it.

    An old marker is what `kubectl apply` after a config change, or after replacing the archive,
    shows while preprocess still hashes the archive: sharding against it would call old shards done
    and train on the old split. Past the timeout a marker that still does not match is bad input
    (exit 2) naming the settings.
    """
    timeout_s = config.cluster.upstream_wait_timeout_s
    deadline = time.monotonic() + timeout_s
    storage.wait_for(layout.interim_marker, timeout_s, what="the preprocess stage's marker (interim/_SUCCESS.json)")

    def check() -> tuple[dict[str, Any] | None, list[upstream.Mismatch]]:
        marker = upstream.read_interim_marker(layout)
        if marker is None:
            return None, [("interim/_SUCCESS.json", "unreadable", "a marker")]
        return marker, upstream.interim_mismatches(marker, config)

    def give_up(marker: dict[str, Any] | None, mismatches: list[upstream.Mismatch]) -> Exception:
        if marker is None:
            storage.wait_for(layout.interim_marker, 0, what="the preprocess stage's marker (interim/_SUCCESS.json)")
            return BadInputError(f"{layout.interim_marker} cannot be read; rerun the preprocess stage")
        shown = ", ".join(f"{key}={theirs}" for key, theirs, _ in mismatches[:3])
        wanted = ", ".join(f"{key}={ours}" for key, _, ours in mismatches[:3])
        more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        return BadInputError(f"interim/ was made with {shown} but this config has {wanted}{more} "
                             f"({layout.interim_marker}); rerun preprocess with this config (or raise "
                             "cluster.upstream_wait_timeout_s if it is running now)")

    return upstream.wait_until_current(check, deadline=deadline, give_up=give_up, poll_s=_UPSTREAM_POLL_S,
                                       waiting_for="an interim marker made with this config")


# ---------------------------------------------------------------------------------------- manifest

def _read_manifest_bytes(path: str) -> bytes:
    if not storage.exists(path):
        raise BadInputError(f"split manifest {path} is missing although interim/_SUCCESS.json exists; "
                            "rerun the preprocess stage")
    return storage.read_bytes(path)


def validate_manifest(manifest_bytes: bytes, path: str) -> list[dict[str, Any]]:
    """The manifest's rows, checked field by field; BadInputError names the row and field."""
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as error:
        raise BadInputError(f"split manifest {path} is not valid JSON ({error}); rerun the preprocess stage") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("rows"), list):
        raise BadInputError(f"split manifest {path} has no 'rows' list; rerun the preprocess stage")
    if tuple(manifest.get("class_names", CLASS_NAMES)) != CLASS_NAMES:
        raise BadInputError(f"split manifest {path} has class_names {manifest.get('class_names')}, expected "
                            f"{list(CLASS_NAMES)}; rerun the preprocess stage with this version")
    for number, row in enumerate(manifest["rows"]):
        where = f"split manifest {path}, row {number}"
        if not isinstance(row, dict):
            raise BadInputError(f"{where} is not an object; rerun the preprocess stage")
        for field, kind in (("path", str), ("class", str), ("label", int), ("patient", str), ("split", str)):
            if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
                raise BadInputError(f"{where}: field {field!r} = {row.get(field)!r} must be a {kind.__name__}; "
                                    "rerun the preprocess stage")
        if row["class"] not in CLASS_NAMES or CLASS_NAMES.index(row["class"]) != row["label"]:
            raise BadInputError(f"{where} ({row['path']}): class {row['class']!r} and label {row['label']} do not "
                                f"agree with {list(CLASS_NAMES)}; rerun the preprocess stage")
        if row["split"] not in (*SPLITS, "unused"):
            raise BadInputError(f"{where} ({row['path']}): split {row['split']!r} is not one of train, val, test, "
                                "unused; rerun the preprocess stage")
    paths = [row["path"] for row in manifest["rows"]]
    if len(set(paths)) != len(paths):
        raise BadInputError(f"split manifest {path} lists a path twice; rerun the preprocess stage")
    return manifest["rows"]


# ---------------------------------------------------------------------------------------- planning

def num_shards_for(num_rows: int, config: PipelineConfig) -> int:
    """Enough files to keep each near shard.target_shard_bytes, at least shard.min_shards_per_split and
    cluster.num_workers (FILE autosharding needs a file per worker), rounded up to a multiple of the
    workers (else some read more files than others, and the data each sees is uneven), never more
    than records.

    Sized from the uncompressed pixels, an upper bound for PNG of natural images, so the count
    depends only on the config and the manifest and every writer computes the same plan.
    """
    shard = config.shard
    record_bytes = shard.image_height * shard.image_width * shard.channels + _RECORD_OVERHEAD_BYTES
    by_size = math.ceil(num_rows * record_bytes / shard.target_shard_bytes)
    num_workers = config.cluster.num_workers
    wanted = max(by_size, shard.min_shards_per_split, num_workers)
    return max(1, min(num_rows, math.ceil(wanted / num_workers) * num_workers))


def _order_key(seed: int, path: str) -> str:
    # A keyed hash is a shuffle that no library upgrade can change: byte-identical shards forever.
    return hashlib.sha256(f"{seed}/{path}".encode()).hexdigest()


def plan_shards(rows: list[dict[str, Any]], config: PipelineConfig) -> list[ShardPlan]:
    """Every shard of every split, in a fixed order (train, val, test; then by index).

    Each class is dealt round-robin over the shards in a seeded-shuffled order, continuing where
    the previous class stopped, so shard sizes differ by at most one record and every shard has
    the class mix; within a shard the records are shuffled too.
    """
    seed = config.split.seed
    plans = []
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        if not split_rows:
            continue
        num_shards = num_shards_for(len(split_rows), config)
        buckets: list[list[dict[str, Any]]] = [[] for _ in range(num_shards)]
        position = 0
        for class_name in CLASS_NAMES:
            members = sorted((r for r in split_rows if r["class"] == class_name),
                             key=lambda r: _order_key(seed, r["path"]))
            for row in members:
                buckets[position % num_shards].append(row)
                position += 1
        for shard_index, bucket in enumerate(buckets):
            bucket.sort(key=lambda r: _order_key(seed + 1, r["path"]))
            plans.append(ShardPlan(split, shard_index, num_shards, tuple(bucket)))
    return plans


def _output_settings(config: PipelineConfig) -> dict[str, Any]:
    """The settings that change shard bytes (not who writes them or how long anyone waits): the keys
    config.py declares to decide SHARDS, named as markers have recorded them since version 1 (a shard
    key by its own name, another as section_key), plus this code's own encoder settings."""
    shard = config.shard
    declared = {(key if section == "shard" else f"{section}_{key}"): value
                for section, values in settings_deciding(config, SHARDS).items() for key, value in values.items()}
    return {"format_version": tfrecords.FORMAT_VERSION, **declared,
            "jpeg_quality": imaging.JPEG_QUALITY if shard.encoding == "jpeg" else None,
            "png_compression": imaging.PNG_COMPRESSION if shard.encoding == "png" else None,
            "resize": imaging.RESIZE_METHOD}


def compute_fingerprint(manifest_sha256: str, config: PipelineConfig) -> str:
    """The shard set's identity, stored as the marker's top-level "fingerprint" (and in every sidecar).

    `manifest_sha256` is the sha256 hex digest of splits/split.json's bytes (the marker's
    "split_manifest_sha256"); a reader (the trainer) recomputes this from the manifest and its config
    and compares it to the marker's to know the shards match both.
    """
    payload = json.dumps({"manifest_sha256": manifest_sha256, **_output_settings(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _worker_index(config: PipelineConfig) -> int:
    index = config.shard.index
    if index < 0:
        index = cluster.completion_index() or 0
    if index >= config.shard.num_workers:
        raise BadInputError(f"shard worker index {index} is not below shard.num_workers "
                            f"({config.shard.num_workers}); set shard.num_workers to the Job's completions")
    return index


# ---------------------------------------------------------------------------------------- writing

def write_shards(out_dir: str, plans: list[ShardPlan], config: PipelineConfig, fingerprint: str) -> None:
    """Writes each shard under a temporary name, moves it into place, then writes its sidecar.

    One tf.data pipeline spans all the given shards, so decoding never stalls at a shard boundary.
    A shard stored with another size than was written (an upload that met a storage fault) is
    written again, up to storage.WRITE_ATTEMPTS times in all.
    """
    for attempt in range(1, storage.WRITE_ATTEMPTS + 1):
        plans = _write_shards_once(out_dir, plans, config, fingerprint)
        if not plans:
            return
        log.warning("shards stored with another size than written; writing them again",
                    shards=[plan.name for plan in plans], attempt=attempt)
    raise StorageError(f"shards {', '.join(plan.name for plan in plans)} in {out_dir} were stored with another size "
                       f"than written {storage.WRITE_ATTEMPTS} times; the storage is failing: retry later")


def _write_shards_once(out_dir: str, plans: list[ShardPlan], config: PipelineConfig,
                       fingerprint: str) -> list[ShardPlan]:
    """Writes the shards; returns those whose stored size differs from what was written (not moved into place)."""
    if not plans:
        return []
    shard = config.shard
    root = config.data.root.rstrip("/")
    height, width, channels = shard.image_height, shard.image_width, shard.channels
    sources = [storage.join(root, row["path"]) for plan in plans for row in plan.rows]

    def load(path: tf.Tensor) -> tuple:
        resized, original_height, original_width = imaging.load_resized(tf.io.read_file(path), height, width, channels,
                                                                        fit=shard.fit)
        return imaging.encode(resized, shard.encoding), original_height, original_width

    iterator = progress.track(_encoded_records(sources, load), "shard: resize and encode", len(sources),
                              unit="records")
    stored_wrong = []
    for plan in plans:
        try:
            _write_shard(out_dir, plan, iterator, config, fingerprint)
        except _StoredSizeDiffers as error:
            log.warning("shard stored with another size than written", shard=plan.name, error=str(error))
            stored_wrong.append(plan)
    return stored_wrong


def _encoded_records(sources: list[str], load: Any) -> Iterator[tuple[bytes, int, int]]:
    """(encoded image, original height, original width) of each source, in order, decoded in parallel.

    Deterministic order: record i is source i. Python takes the records a batch at a time: one step
    of a tf.data iterator costs ~0.2 ms of CPU, as much as encoding the image, and the parallel
    decode needs that CPU. An unreadable source fails its whole batch, so the batch is taken again
    one record at a time: the error then comes at the record it belongs to, as the writer expects.
    """
    def records(paths: list[str]) -> tf.data.Dataset:
        # Autograph is left out: `load` has no Python control flow on tensors, and converting it cost
        # ~0.5 s of CPU per process, a quarter of a second's worth of decoding.
        return tf.data.Dataset.from_tensor_slices(paths).map(
            tf.autograph.experimental.do_not_convert(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    done = 0
    try:
        for images, heights, widths in records(sources).batch(_RECORDS_PER_BATCH).prefetch(tf.data.AUTOTUNE):
            batch = zip(images.numpy().tolist(), heights.numpy().tolist(), widths.numpy().tolist(), strict=True)
            for record in batch:
                yield record
                done += 1
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        for image, height, width in records(sources[done:]).prefetch(tf.data.AUTOTUNE):
            yield image.numpy(), int(height), int(width)


class _StoredSizeDiffers(StorageError):
    """A shard's temporary file holds another number of bytes than its records add up to."""


def _write_shard(out_dir: str, plan: ShardPlan, encoded_images: Any, config: PipelineConfig,
                 fingerprint: str) -> None:
    shard = config.shard
    path = storage.join(out_dir, plan.name)
    class_counts = dict.fromkeys(CLASS_NAMES, 0)
    num_bytes_written = 0
    with storage.atomic_path(path) as temp:
        with tf.io.TFRecordWriter(temp) as writer:
            for row in plan.rows:
                try:
                    encoded, original_height, original_width = next(encoded_images)
                except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
                    raise _unreadable_image(config, row, error) from None
                serialized = tfrecords.encode_example(tfrecords.Record(
                    image=encoded, image_format=shard.encoding, height=shard.image_height,
                    width=shard.image_width, channels=shard.channels, label=row["label"], class_name=row["class"],
                    patient=row["patient"], source_path=row["path"], original_height=original_height,
                    original_width=original_width))
                writer.write(serialized)
                num_bytes_written += len(serialized) + _TFRECORD_FRAMING_BYTES
                class_counts[row["class"]] += 1
        # An upload that met a storage fault can end short (even empty) without an error: check the size.
        num_bytes_stored = storage.size(temp)
        if num_bytes_stored != num_bytes_written:
            raise _StoredSizeDiffers(f"{path}: {num_bytes_stored} bytes stored, {num_bytes_written} written")
        # Checksum what is about to be moved into place: the sidecar vouches for these bytes.
        summary = {"name": plan.name, "split": plan.split, "num_records": len(plan.rows),
                   "bytes": num_bytes_stored, "sha256": storage.sha256_file(temp), "class_counts": class_counts}
    storage.write_json(storage.join(out_dir, tfrecords.sidecar_name(plan.name)),
                       {**summary, "fingerprint": fingerprint})
    log.info("shard written", shard=plan.name, num_records=summary["num_records"], bytes=summary["bytes"])


def _unreadable_image(config: PipelineConfig, row: dict[str, Any], error: tf.errors.OpError) -> Exception:
    """A storage fault when the interim image is missing or differs from the manifest's sha256 (retryable),
    else bad input: the bytes preprocess vouched for do not decode."""
    path = storage.join(config.data.root.rstrip("/"), row["path"])
    detail = error.message.splitlines()[0]
    found = storage.sha256_file(path) if storage.exists(path) else None
    if row.get("sha256") and found != row["sha256"]:
        state = "is missing" if found is None else f"differs from the split manifest's sha256 (found sha256 {found})"
        layout = Layout.of(config)
        return StorageError(f"interim image {path} {state}: {detail}. The preprocess stage wrote it: delete "
                            f"{layout.interim_marker} and rerun the preprocess stage")
    return BadInputError(
        f"cannot read image {path} (manifest row {row['path']}, split {row['split']}): {detail}; rerun the "
        "preprocess stage or remove the file from interim/ and the manifest")


def _read_sidecar(out_dir: str, plan: ShardPlan, fingerprint: str) -> dict[str, Any] | None:
    path = storage.join(out_dir, tfrecords.sidecar_name(plan.name))
    if not storage.exists(path):
        return None
    try:
        sidecar = storage.read_json(path)
    except (ValueError, tf.errors.OpError):
        return None  # a half-written or foreign file: the shard is simply redone
    if sidecar.get("fingerprint") != fingerprint or sidecar.get("num_records") != len(plan.rows):
        return None
    return sidecar


def _is_complete(out_dir: str, plan: ShardPlan, fingerprint: str) -> bool:
    """The shard is there with the bytes its sidecar vouches for (a restart skips it)."""
    sidecar = _read_sidecar(out_dir, plan, fingerprint)
    path = storage.join(out_dir, plan.name)
    if sidecar is None or not storage.exists(path):
        return False
    return storage.size(path) == sidecar["bytes"] and storage.sha256_file(path) == sidecar["sha256"]


# ---------------------------------------------------------------------------------------- finishing

def _finish(out_dir: str, plans: list[ShardPlan], config: PipelineConfig, fingerprint: str, manifest_sha256: str,
            rows: list[dict[str, Any]], index: int) -> dict[str, Any]:
    """Waits (bounded) until the marker exists or every shard does; in the latter case writes it."""
    marker_path = storage.join(out_dir, MARKER_NAME)
    timeout_s = config.shard.marker_wait_timeout_s
    deadline = time.monotonic() + timeout_s
    # A shard counts as present only with a sidecar of this fingerprint: after a settings change that
    # keeps the shard names (png -> jpeg), the old sidecars must not pass for the other workers' shards.
    # A sidecar once matching stays so (it is only ever rewritten for the same fingerprint), so each is
    # read once it appears, not on every pass.
    confirmed: set[str] = set()
    next_log = 0.0
    while True:
        if storage.exists(marker_path):
            marker = storage.read_json(marker_path)
            if marker.get("fingerprint") == fingerprint and marker.get("split_manifest_sha256") == manifest_sha256:
                log.info("marker written by another worker", marker=marker_path)
                return marker
        present = set(storage.listdir(out_dir))
        for plan in plans:
            if (plan.name not in confirmed and tfrecords.sidecar_name(plan.name) in present
                    and _read_sidecar(out_dir, plan, fingerprint) is not None):
                confirmed.add(plan.name)
        missing = sorted(plan.name for plan in plans if plan.name not in confirmed)
        if not missing:
            marker = _write_marker(out_dir, plans, config, fingerprint, manifest_sha256, rows, index)
            if marker is not None:
                return marker
            continue  # another worker won the race: its marker is read on the next pass
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"waited {timeout_s} s for other shard workers; still missing {len(missing)} shards, "
                               f"e.g. {', '.join(missing[:3])} (raise shard.marker_wait_timeout_s or check the "
                               "other workers)")
        if now >= next_log:
            log.info("waiting for other workers' shards", num_missing=len(missing),
                     seconds_left=round(deadline - now))
            next_log = now + 60.0
        time.sleep(POLL_S)


def _write_marker(out_dir: str, plans: list[ShardPlan], config: PipelineConfig, fingerprint: str,
                  manifest_sha256: str, rows: list[dict[str, Any]], index: int) -> dict[str, Any] | None:
    """Verifies every shard (rewriting any that fails), runs the round-trip check, creates the marker.

    Returns None when another worker created the marker first.
    """
    shards = []
    for plan in plans:
        if not _is_complete(out_dir, plan, fingerprint):
            log.warning("shard incomplete or corrupted; rewriting it", shard=plan.name)
            write_shards(out_dir, [plan], config, fingerprint)
        sidecar = _read_sidecar(out_dir, plan, fingerprint)
        shards.append({key: sidecar[key] for key in ("name", "split", "num_records", "bytes", "sha256",
                                                      "class_counts")})
    _remove_stale_files(out_dir, {shard["name"] for shard in shards})
    summary = roundtrip.check(out_dir, shards, [r for r in rows if r["split"] in SPLITS], config, config.data.root)
    splits: dict[str, dict[str, Any]] = {}
    for shard in shards:
        total = splits.setdefault(shard["split"], {"num_records": 0, "num_shards": 0, "bytes": 0,
                                                   "class_counts": dict.fromkeys(CLASS_NAMES, 0)})
        total["num_records"] += shard["num_records"]
        total["num_shards"] += 1
        total["bytes"] += shard["bytes"]
        for class_name, count in shard["class_counts"].items():
            total["class_counts"][class_name] += count
    layout = Layout.of(config)
    marker = {
        "version": MARKER_VERSION,
        "fingerprint": fingerprint,  # compute_fingerprint(split_manifest_sha256, config)
        "split_manifest_sha256": manifest_sha256,
        "split_manifest": {"path": layout.split_manifest, "sha256": manifest_sha256},
        "image": {"height": config.shard.image_height, "width": config.shard.image_width,
                  "channels": config.shard.channels, "encoding": config.shard.encoding},
        "shard_config": {**_output_settings(config), "shard": config.to_dict()["shard"]},
        "splits": splits,
        "shards": shards,
        "roundtrip": summary,
        "written_by_worker": index,
    }
    storage.write_text(storage.join(out_dir, CONFIG_NAME), config.to_yaml())
    marker_path = storage.join(out_dir, MARKER_NAME)
    created = storage.create_if_absent(marker_path, (json.dumps(marker, indent=2) + "\n").encode())
    if created:
        log.info("marker written", marker=marker_path, num_shards=len(shards),
                 num_records={split: total["num_records"] for split, total in splits.items()})
        return marker
    _remove_if_stale(marker_path, fingerprint, manifest_sha256)
    return None


def _remove_stale_files(out_dir: str, keep: set[str]) -> None:
    """Shards and sidecars of an older plan (another shard count) go, so the folder holds one set."""
    for name in storage.listdir(out_dir):
        if name.startswith(".tmp-"):
            continue  # a write in progress (or an interrupted one); atomic_path owns it
        shard_name = name[1:-len(".json")] if name.startswith(".") and name.endswith(".tfrecord.json") else name
        if shard_name.endswith(".tfrecord") and shard_name not in keep:
            log.info("removing stale shard file", file=name)
            _remove_quietly(storage.join(out_dir, name))


def _remove_if_stale(marker_path: str, fingerprint: str, manifest_sha256: str) -> None:
    # Re-read just before removing, so a fresh marker another worker just wrote is never deleted.
    try:
        marker = storage.read_json(marker_path)
        if marker.get("fingerprint") != fingerprint or marker.get("split_manifest_sha256") != manifest_sha256:
            _remove_quietly(marker_path)
    except tf.errors.NotFoundError:
        pass


def _remove_quietly(path: str) -> None:
    try:
        storage.remove(path)
    except tf.errors.NotFoundError:
        pass  # another worker removed it first


def _verify_against_marker(out_dir: str, marker: dict[str, Any]) -> None:
    """A rerun that finds the marker re-checks every shard, so silent corruption stops here (exit 1, naming it)."""
    pipeline.verify_shards(out_dir)
