"""The preprocess stage: archive -> interim/<class>/<origin split>__<name> + splits/split.json + marker.

Idempotent: the marker records the archive's sha256 and the config that shapes the output; the same
pair again does nothing, a different one rebuilds interim/ and splits/ from scratch (never mixed).
Locally the old outputs are replaced only once the new ones are complete (a failed rerun keeps them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import uuid
from typing import Any

from pneumonia import progress, storage
from pneumonia.config import CLASS_NAMES, INTERIM, PipelineConfig, settings_deciding
from pneumonia.data import archive as archive_lib
from pneumonia.data import split as split_lib
from pneumonia.errors import BadInputError, StorageError
from pneumonia.layout import CONFIG_NAME, Layout
from pneumonia.logs import get_logger

log = get_logger(__name__)

# Bump when the stage's output changes for the same input and config, so old outputs are redone.
PREPROCESS_VERSION = 1
_STAGING_PREFIX = ".preprocess-tmp-"
_NUM_WRITERS = 8  # decode checks and (on gs://) uploads overlap; the zip itself is read by one thread
# Bytes of read entries waiting for a writer thread; with data.max_entry_bytes this bounds the memory held.
_MAX_PENDING_BYTES = 512 * 1024**2
# Rounds of rewriting interim images whose stored bytes differ from what was written (then StorageError).
_MAX_REWRITE_ROUNDS = 3


def run(config: PipelineConfig) -> dict[str, Any]:
    """Runs the stage (or notices it is done) and returns the marker's content."""
    layout = Layout.of(config)
    archive_path = resolve_archive(config, layout)
    archive_lib.require_archive(archive_path)
    archive_identity = storage.identity(archive_path)
    previous = _read_marker(layout)
    archive_sha256 = _known_sha256(previous, archive_path, archive_identity) or storage.sha256_file(archive_path)
    fingerprint = _fingerprint(config, archive_sha256)
    done = _finished_marker(layout, previous, fingerprint)
    if done is not None:
        if (done.get("archive"), done.get("archive_identity")) != (archive_path, archive_identity):
            # Same bytes under another path or timestamp: the later stages compare the identity.
            done = {**done, "archive": archive_path, "archive_identity": archive_identity}
            storage.write_json(layout.interim_marker, done)
        log.info("already done", marker=layout.interim_marker, archive_sha256=archive_sha256)
        return done

    log.info("preprocess start", archive=archive_path, root=layout.root, mode=config.split.mode)
    local = not storage.is_gcs(layout.root)
    # Locally everything is built in a sibling temp folder, and the old outputs are only replaced once
    # the new ones are complete, so a failed rerun (bad archive) leaves the previous good output intact.
    # gs:// has no folder rename: the old outputs are removed first (marker first) and files go straight
    # to their place; the marker, written last, is what makes them count.
    staging = storage.join(layout.root, f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}") if local else layout.root
    with archive_lib.open_archive(archive_path) as zipped:
        # Not a zip, too many entries, a declared bomb: fail before the old outputs are touched.
        listing = archive_lib.list_entries(zipped, archive_path, config.data)
        if local:
            _remove_leftover_staging(layout)
        else:
            _clean(layout)
        try:
            written: dict[str, tuple[int, str, Any]] = {}
            rows, dropped, num_duplicates = _extract(zipped, archive_path, listing, config, staging, written)
            _verify_written(zipped, staging, written)
            _check_layout(archive_path, listing, rows, dropped)
            stats = split_lib.split_rows(rows, config.split)
            manifest = split_lib.build_manifest(rows, config.split)
            storage.write_json(storage.join(staging, "splits", "split.json"), manifest)
            storage.write_text(storage.join(staging, "interim", CONFIG_NAME), config.to_yaml())
            if local:
                _clean(layout)
                _publish_local(staging, layout)
        finally:
            if local:
                storage.remove_tree(staging)

    counts = manifest["counts"]
    _report(counts, manifest, config, stats)
    marker = {
        "stage": "preprocess",
        "version": PREPROCESS_VERSION,
        "archive": archive_path,
        "archive_identity": archive_identity,  # storage.identity: what the later stages compare
        "archive_sha256": archive_sha256,
        "fingerprint": fingerprint,
        "config": {"data": dataclasses.asdict(config.data), "split": dataclasses.asdict(config.split)},
        "num_images": len(rows),
        "counts": counts,
        "class_weights": manifest["class_weights"],
        "imbalance_ratio": manifest["imbalance_ratio"],
        "num_clutter": listing.num_clutter,
        "num_duplicates": num_duplicates,
        "num_overlap_unused": stats["num_overlap_unused"],
        "num_dropped": len(dropped),
        "dropped": [item.to_dict() for item in dropped],
        "split_manifest": layout.split_manifest,
    }
    storage.write_json(layout.interim_marker, marker)  # last: it is what says the stage is done
    log.info("preprocess done", num_images=len(rows), num_dropped=len(dropped), num_duplicates=num_duplicates,
             num_clutter=listing.num_clutter, marker=layout.interim_marker)
    return marker


def resolve_archive(config: PipelineConfig, layout: Layout) -> str:
    """data.archive, or else the single zip under <root>/raw/ (where the cluster uploads it)."""
    if config.data.archive:
        return config.data.archive
    zips = storage.glob(storage.join(layout.raw, "*.zip"))
    if len(zips) == 1:
        return zips[0]
    found = f"found {len(zips)} zips there" if zips else "found none"
    raise BadInputError(f"data.archive is not set and {layout.raw}/ does not hold exactly one .zip ({found}); "
                        "pass --set data.archive=PATH (or make one: python -m pneumonia.data.demo --out PATH)")


def _read_marker(layout: Layout) -> dict[str, Any] | None:
    """The interim marker of an earlier run, or None (none, or unreadable: then everything is redone)."""
    if not storage.exists(layout.interim_marker):
        return None
    try:
        marker = storage.read_json(layout.interim_marker)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) else None


def _known_sha256(marker: dict[str, Any] | None, archive_path: str, archive_identity: str | None) -> str | None:
    """The sha256 the marker recorded, when the archive is the one it names, by path and identity.

    Saves reading the whole archive again (minutes for 1.2 GB on gs://) just to find nothing to do.
    """
    if marker is None or archive_identity is None:
        return None
    if (marker.get("archive"), marker.get("archive_identity")) != (archive_path, archive_identity):
        return None
    return marker.get("archive_sha256")


def archive_changed(marker: dict[str, Any], config: PipelineConfig) -> tuple[str, str] | None:
    """(archive path, its identity now) when the archive differs from the one `marker` (interim/_SUCCESS.json)
    was made from; None when it is the same, or when it cannot be found (deleted once preprocessed).

    The shard and train stages wait while this is not None: right after the archive is replaced,
    the old marker stays until preprocess has hashed the new archive and removed it.
    """
    try:
        path = resolve_archive(config, Layout.of(config))
    except BadInputError:
        return None
    current = storage.identity(path)
    if current is None or current == marker.get("archive_identity"):
        return None
    return path, current


def _fingerprint(config: PipelineConfig, archive_sha256: str) -> dict[str, Any]:
    """Everything that changes the output (the keys config.py declares to decide INTERIM); not the
    archive's path nor the run id."""
    return {"version": PREPROCESS_VERSION, "archive_sha256": archive_sha256, **settings_deciding(config, INTERIM)}


def _finished_marker(layout: Layout, marker: dict[str, Any] | None, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    if marker is None or not storage.exists(layout.split_manifest):
        return None
    if marker.get("fingerprint") != fingerprint:
        log.info("inputs changed; redoing", marker=layout.interim_marker)
        return None
    return marker


def _clean(layout: Layout) -> None:
    """Marker first: from here on nothing under interim/ counts as done until the new marker lands."""
    storage.remove(layout.interim_marker)
    storage.remove_tree(layout.interim)
    storage.remove_tree(storage.join(layout.root, "splits"))


def _remove_leftover_staging(layout: Layout) -> None:
    """Local only: staging folders left by a crashed run (this run's own is created later)."""
    if not storage.exists(layout.root):
        return
    for name in storage.listdir(layout.root):
        if name.startswith(_STAGING_PREFIX):
            storage.remove_tree(storage.join(layout.root, name))


def _publish_local(staging: str, layout: Layout) -> None:
    os.rename(storage.join(staging, "interim"), layout.interim)
    os.rename(storage.join(staging, "splits"), os.path.dirname(layout.split_manifest))


def _extract(zipped: Any, archive_path: str, listing: archive_lib.Listing, config: PipelineConfig,
             staging: str, written: dict[str, tuple[int, str, Any]],
             ) -> tuple[list[dict[str, Any]], list[archive_lib.Dropped], int]:
    """Reads each candidate once, drops duplicates by content, checks it decodes, writes its bytes.

    `written` gets each image written: path -> (size, CRC32C, zip entry), for `_verify_written`.
    """
    budget = archive_lib.InflateBudget(config.data, archive_path)
    dropped = list(listing.dropped)
    rows: list[dict[str, Any]] = []
    seen_hashes: dict[str, str] = {}
    seen_paths: dict[str, str] = {}
    num_duplicates = 0
    num_unparsed = 0
    for class_name in CLASS_NAMES:
        storage.makedirs(storage.join(staging, "interim", class_name))

    def check_and_write(candidate: archive_lib.Candidate, data: bytes, row: dict[str, Any]):  # noqa: ANN202
        problem = archive_lib.check_image(data)
        if problem is None:
            # The staging folder (or a GCS object, visible only once complete) is already safe from readers.
            with storage.open_file(storage.join(staging, row["path"]), "wb") as handle:
                handle.write(data)
            written[row["path"]] = (len(data), storage.crc32c(data), candidate.info)
        return candidate, row, problem

    pending: collections.deque = collections.deque()

    pending_bytes = 0

    def collect(future: concurrent.futures.Future, num_bytes: int) -> None:
        nonlocal pending_bytes
        pending_bytes -= num_bytes
        candidate, row, problem = future.result()
        if problem is None:
            rows.append(row)
        else:
            dropped.append(archive_lib.Dropped(candidate.entry, problem))

    # Shallowest first, so the nested chest_xray/chest_xray/ copy is the one found to be a duplicate;
    # within a depth in file order, so reads stream through the buffer instead of seeking back and forth.
    ordered = sorted(listing.candidates, key=lambda c: (c.depth, c.info.header_offset))
    with concurrent.futures.ThreadPoolExecutor(_NUM_WRITERS) as pool:
        for candidate in progress.track(ordered, "preprocess: hash and decode-check", len(ordered)):
            try:
                data = budget.read(zipped, candidate.info)
            except archive_lib.READ_ERRORS as error:
                dropped.append(archive_lib.Dropped(candidate.entry, f"damaged zip entry: {archive_lib.describe(error)}"))
                continue
            if not data:
                dropped.append(archive_lib.Dropped(candidate.entry, "empty file"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen_hashes:
                num_duplicates += 1
                continue
            seen_hashes[digest] = candidate.entry
            path = f"interim/{candidate.class_name}/{candidate.origin_split}__{candidate.base_name}"
            if path in seen_paths:
                dropped.append(archive_lib.Dropped(
                    candidate.entry, f"same name as {seen_paths[path]} but different bytes; kept that one"))
                continue
            seen_paths[path] = candidate.entry
            patient = split_lib.patient_id(candidate.base_name)
            if patient is None:
                num_unparsed += 1
                patient = candidate.base_name.rsplit(".", 1)[0]  # its own patient: never merged by a guess
            row = {"path": path, "class": candidate.class_name, "label": CLASS_NAMES.index(candidate.class_name),
                   "patient": patient, "split": "", "origin_split": candidate.origin_split, "sha256": digest}
            pending.append((pool.submit(check_and_write, candidate, data, row), len(data)))
            pending_bytes += len(data)
            del data  # the queued task holds the only reference
            # Bounds the bytes held in memory, in entries and in bytes (a few large entries).
            while pending and (len(pending) > 4 * _NUM_WRITERS or pending_bytes > _MAX_PENDING_BYTES):
                collect(*pending.popleft())
        while pending:
            collect(*pending.popleft())
    if num_unparsed:
        log.warning("patient id not parsed from some names; each such image is its own patient",
                    num_images=num_unparsed)
    if num_duplicates:
        log.info("dropped duplicate images (same bytes)", num_duplicates=num_duplicates)
    dropped.sort(key=lambda item: item.entry)
    for item in dropped:
        log.warning("dropped file", entry=item.entry, reason=item.reason)
    return rows, dropped, num_duplicates


def _verify_written(zipped: Any, staging: str, written: dict[str, tuple[int, str, Any]]) -> None:
    """Checks every interim image against one listing and rewrites those missing or different (bounded).

    The marker must not vouch for an image that is not there: a GCS upload that met a 503 can end
    as an empty object without the writer hearing of it.
    """
    expected = {path: (size, crc) for path, (size, crc, _) in written.items()}
    for round_number in range(_MAX_REWRITE_ROUNDS + 1):
        wrong = storage.find_mismatched(staging, expected)
        if not wrong:
            return
        if round_number == _MAX_REWRITE_ROUNDS:
            break
        log.warning("interim images differ from what was written; rewriting them", num_images=len(wrong),
                    examples={path: wrong[path] for path in sorted(wrong)[:3]}, round=round_number + 1)
        for path in wrong:
            with storage.open_file(storage.join(staging, path), "wb") as handle:
                handle.write(zipped.read(written[path][2]))
    shown = "; ".join(f"{storage.join(staging, path)}: {wrong[path]}" for path in sorted(wrong)[:3])
    raise StorageError(f"{len(wrong)} interim images still differ from what was written after "
                       f"{_MAX_REWRITE_ROUNDS} rewrites (e.g. {shown}); the storage is failing: retry later")


def _check_layout(archive_path: str, listing: archive_lib.Listing, rows: list[dict[str, Any]],
                  dropped: list[archive_lib.Dropped]) -> None:
    """Bad input when a folder or class the pipeline needs has no usable image."""
    problems = collections.Counter(item.reason.split(":")[0] for item in dropped)
    summary = "; ".join(f"{n} x {reason}" for reason, n in problems.most_common(3)) or "none dropped"
    for origin in ("train", "test"):
        if not any(row["origin_split"] == origin for row in rows):
            num_found = sum(1 for c in listing.candidates if c.origin_split == origin)
            raise BadInputError(f"archive {archive_path} has no usable image under a {origin}/ folder "
                                f"({num_found} candidate entries there; dropped: {summary}); "
                                f"{archive_lib.LAYOUT_HINT}")
    for class_name in CLASS_NAMES:
        if not any(row["class"] == class_name for row in rows):
            raise BadInputError(f"archive {archive_path} has no usable image of class {class_name} "
                                f"(dropped: {summary}); every class needs images: NORMAL/ for normal, "
                                "PNEUMONIA/ names with 'bacteria' or 'virus' for the others")


def _report(counts: dict[str, dict[str, int]], manifest: dict[str, Any], config: PipelineConfig,
            stats: dict[str, Any]) -> None:
    print(split_lib.format_table(counts), flush=True)
    ratio = manifest["imbalance_ratio"]
    log.info("class counts", counts=counts, class_weights=manifest["class_weights"], imbalance_ratio=ratio)
    if ratio > config.split.imbalance_warn_ratio:
        log.warning("class imbalance in train", imbalance_ratio=ratio,
                    imbalance_warn_ratio=config.split.imbalance_warn_ratio,
                    hint="class weights in the manifest compensate; check the archive if this is unexpected")
    if stats["num_overlap_unused"]:
        log.warning("train/val images of patients also in test/ left unused", num_images=stats["num_overlap_unused"])
    for split in ("val", "test"):
        missing = [name for name in CLASS_NAMES if counts[split][name] == 0]
        if missing:
            log.warning("split lacks a class", split=split, classes=missing)
