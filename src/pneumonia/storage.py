"""Paths that are local folders or gs:// URLs, one API for both.

Reads, writes and listings go through `tf.io.gfile`, which speaks both natively (and is what
tf.data, checkpoints and TensorBoard use too). The google-cloud-storage client does the two things
gfile does badly: uploading a large archive (resumable, with progress and a checksum) and
create-if-absent writes (`if_generation_match=0`), which make "first writer wins" markers safe.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pneumonia import tf_startup

# Every caller gets TensorFlow without its start-up lines (the launcher's archive upload printed them;
# the stages have imported it quietly already, after their SIGTERM handler, and this is a no-op then).
tf_startup.import_tensorflow()
import tensorflow as tf  # noqa: E402

from pneumonia.errors import StorageError, UpstreamMissingError  # noqa: E402
from pneumonia.logs import get_logger  # noqa: E402

log = get_logger(__name__)

GCS_SCHEME = "gs://"
_CHUNK = 8 * 1024 * 1024
# Writes of a file whose stored bytes differ from what was written, before giving up (StorageError),
# and the pause before the n-th rewrite (REWRITE_BACKOFF_S * 2**(n-1), so 1, 2, 4 s): storage that
# just failed one upload is given time, as every retrying client does, instead of three writes in 3 s.
WRITE_ATTEMPTS = 4
REWRITE_BACKOFF_S = 1.0


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_SCHEME)


def join(root: str, *parts: str) -> str:
    path = str(root).rstrip("/")
    for part in parts:
        path = f"{path}/{str(part).strip('/')}"
    return path


def split_gcs(url: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, name = url[len(GCS_SCHEME):].partition("/")
    return bucket, name


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def makedirs(path: str) -> None:
    if not is_gcs(path):  # GCS has no folders; objects create their prefixes
        tf.io.gfile.makedirs(path)


def listdir(path: str) -> list[str]:
    if not tf.io.gfile.isdir(path):
        return []
    return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path))


def glob(pattern: str) -> list[str]:
    return sorted(tf.io.gfile.glob(pattern))


def size(path: str) -> int:
    return tf.io.gfile.stat(path).length


def open_file(path: str, mode: str = "rb") -> Any:
    return tf.io.gfile.GFile(path, mode)


def read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as handle:
        return handle.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove(path: str) -> None:
    if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def remove_tree(path: str) -> None:
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


def temp_name(path: str) -> str:
    """A sibling name for a write in progress: same folder (so the rename stays cheap), unique."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/.tmp-{uuid.uuid4().hex[:12]}-{name}" if folder else f".tmp-{uuid.uuid4().hex[:12]}-{name}"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write; on success it is renamed onto `path`, on error removed.

    Readers never see a half-written file: locally the rename is atomic; on GCS an object only
    appears once its upload completes, and the rename is a server-side copy of a finished object.
    """
    parent = path.rpartition("/")[0]
    if parent:
        makedirs(parent)
    temp = temp_name(path)
    try:
        yield temp
        tf.io.gfile.rename(temp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.remove(temp)


def write_bytes(path: str, data: bytes) -> None:
    """Atomic write: temp name, then move; then checked, and rewritten (bounded, with backoff) if it differs.

    A GCS upload that met a 503 can end as a complete but empty object without any error reaching
    the writer. The check asks the storage itself, once, for what it holds (gs://: the object's size
    and CRC32C in one metadata request of google-cloud-storage; locally: the file's size): a reread
    through TensorFlow's gs:// client could be answered from its stat cache (5 s).
    """
    _write_checked(path, lambda temp: _write_file(temp, data), (len(data), crc32c(data)), "what was written")


def _write_file(path: str, data: bytes) -> None:
    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, payload: Any) -> None:
    write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def copy_from_local(local_path: str, path: str) -> None:
    """Copies a local file to `path` atomically, checked and copied again as write_bytes does (for
    files made locally: h5py writes only local files)."""
    wanted = (os.path.getsize(local_path), _crc32c_b64(local_path))
    _write_checked(path, lambda temp: tf.io.gfile.copy(local_path, temp, overwrite=True), wanted, local_path)


def _write_checked(path: str, write: Callable[[str], None], wanted: tuple[int, str], source: str) -> None:
    """`write(temp)` under a temporary name, moved onto `path`; repeated while the stored (size, CRC32C)
    differs from `wanted`, up to WRITE_ATTEMPTS times with a growing pause; then StorageError (retryable)."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        with atomic_path(path) as temp:
            write(temp)
        size, crc, generation = _stored_size_crc32c_generation(path)
        if size == wanted[0] and crc in (None, wanted[1]):
            if attempt > 1:
                log.info("stored file matches what was written", path=path, attempt=attempt)
            return
        pause_s = REWRITE_BACKOFF_S * 2 ** (attempt - 1) if attempt < WRITE_ATTEMPTS else None
        log.warning("stored file differs from what was written; writing it again", path=path, attempt=attempt,
                    bytes_written=wanted[0], bytes_stored=size, crc32c_written=wanted[1], crc32c_stored=crc,
                    generation=generation, next_write_in_s=pause_s)
        if pause_s is not None:
            time.sleep(pause_s)
    raise StorageError(f"{path} still differs from {source} after {WRITE_ATTEMPTS} writes ({wanted[0]} bytes "
                       f"written, {size} stored); the storage is failing: retry later")


def _stored_size_crc32c_generation(path: str) -> tuple[int, str | None, int | None]:
    """(size, CRC32C, generation) of a stored file, -1 for the size when it is missing; gs://: one metadata
    request, never a cache; locally the size only (a local write that fails raises)."""
    if is_gcs(path):
        bucket_name, name = split_gcs(path)
        blob = gcs_client().bucket(bucket_name).get_blob(name)
        return (-1, None, None) if blob is None else (blob.size, blob.crc32c, blob.generation)
    try:
        return os.path.getsize(path), None, None
    except FileNotFoundError:
        return -1, None, None


def copy_to_local(path: str, local_path: str) -> None:
    tf.io.gfile.copy(path, local_path, overwrite=True)


def create_if_absent(path: str, data: bytes) -> bool:
    """Writes `data` only if nothing is at `path`; returns whether this call created it.

    Safe when several workers race: exactly one wins. Locally a hard link of a finished temp file
    fails if the target exists; on GCS the upload carries if_generation_match=0.
    """
    if is_gcs(path):
        from google.api_core import exceptions as gcs_errors

        bucket_name, name = split_gcs(path)
        bucket = gcs_client().bucket(bucket_name)
        blob = bucket.blob(name)
        # The client retries a conditional upload whose response was lost; the retry then meets
        # our own object and gets 412. A token in the metadata tells "we won earlier" from "lost".
        token = uuid.uuid4().hex
        blob.metadata = {"create-if-absent-token": token}
        try:
            blob.upload_from_string(data, if_generation_match=0)
        except gcs_errors.PreconditionFailed:
            existing = bucket.get_blob(name)
            return existing is not None and (existing.metadata or {}).get("create-if-absent-token") == token
        return True
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    temp = temp_name(path)
    with open(temp, "wb") as handle:
        handle.write(data)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(temp)


def crc32c(data: bytes) -> str:
    """CRC32C of bytes, base64 as GCS reports it (what `find_mismatched` compares)."""
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def find_mismatched(root: str, expected: Mapping[str, tuple[int, str]]) -> dict[str, str]:
    """{path: what is wrong} for each `root`-relative path whose stored file is missing or differs
    from its expected (size, crc32c); checked against one listing per top folder, no file is read.

    gs:// compares size and CRC32C (GCS keeps both with every object). Locally only the size: a
    local write that fails raises, and re-reading every file would cost a full read.
    """
    wrong = {}
    for folder in sorted({path.split("/", 1)[0] for path in expected}):
        stored = _list_sizes_and_crc32c(join(root, folder))
        for path in sorted(p for p in expected if p.split("/", 1)[0] == folder):
            size_wanted, crc_wanted = expected[path]
            found = stored.get(path.split("/", 1)[1] if "/" in path else "")
            if found is None:
                wrong[path] = "missing"
            elif found[0] != size_wanted:
                wrong[path] = f"{found[0]} bytes stored, {size_wanted} written"
            elif found[1] is not None and found[1] != crc_wanted:
                wrong[path] = f"CRC32C {found[1]} stored, {crc_wanted} written"
    return wrong


def _list_sizes_and_crc32c(folder: str) -> dict[str, tuple[int, str | None]]:
    """Every file under `folder` (recursively, by relative path) -> (size, CRC32C or None locally)."""
    if is_gcs(folder):
        bucket_name, prefix = split_gcs(folder.rstrip("/") + "/")
        return {blob.name[len(prefix):]: (blob.size, blob.crc32c)
                for blob in gcs_client().list_blobs(bucket_name, prefix=prefix)}
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder).replace(os.sep, "/")] = (os.path.getsize(path), None)
    return found


def wait_for(path: str, timeout_s: float, what: str, poll_s: float = 10.0) -> None:
    """Waits (bounded, logged) until `path` exists; raises UpstreamMissingError past the timeout."""
    deadline = time.monotonic() + timeout_s
    next_log = 0.0
    while not exists(path):
        now = time.monotonic()
        if now >= deadline:
            raise UpstreamMissingError(
                f"{what} is missing: {path} does not exist"
                + (f" after waiting {timeout_s:.0f} s" if timeout_s else "")
                + "; run the upstream stage first (or raise cluster.upstream_wait_timeout_s)"
            )
        if now >= next_log:
            log.info("waiting for upstream", marker=path, what=what, seconds_left=round(deadline - now))
            next_log = now + 60.0
        time.sleep(min(poll_s, max(0.0, deadline - now)))


_clients: dict[tuple[int, str], Any] = {}


def gcs_client() -> Any:
    """A google-cloud-storage client; honours STORAGE_EMULATOR_HOST (tests) and Workload Identity.

    One per process (and emulator host): a client holds a connection pool and credentials, which
    must not be shared across fork.
    """
    from google.cloud import storage as gcs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    key = (os.getpid(), emulator)
    if key not in _clients:
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            _clients[key] = gcs.Client(project="test", credentials=AnonymousCredentials())
        else:
            _clients[key] = gcs.Client()
    return _clients[key]


def identity(path: str) -> str | None:
    """A cheap identity of a file's bytes, found without reading them; None when there is no such file.

    gs://: the object's CRC32C and size, which GCS keeps with every object (one metadata request).
    Local: size and modification time, which any rewrite or copy changes. Used to notice a replaced
    archive in seconds where its sha256 takes a full read of 1.2 GB.
    """
    if is_gcs(path):
        bucket_name, name = split_gcs(path)
        blob = gcs_client().bucket(bucket_name).get_blob(name)
        return None if blob is None else f"crc32c={blob.crc32c},size={blob.size}"
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return f"mtime_ns={stat.st_mtime_ns},size={stat.st_size}"


def upload_file(local_path: str, url: str, progress: Callable[[int, int], None] | None = None) -> bool:
    """Uploads a local file to gs:// resumably, verified by CRC32C; skips it if the same object is there.

    `url` may also be a local path (a local run): then the file is copied atomically, with the
    same skip rule and progress. `progress(done, total)` ends with done == total when it copies.
    Returns True when it uploaded, False when the destination already held identical bytes.
    """
    total = os.path.getsize(local_path)
    local_crc32c = _crc32c_b64(local_path)
    if not is_gcs(url):
        if os.path.isfile(url) and os.path.getsize(url) == total and _crc32c_b64(url) == local_crc32c:
            log.info("archive already in place", path=url, bytes=total)
            return False
        with atomic_path(url) as temp, open(local_path, "rb") as source, open(temp, "wb") as target:
            reader = _ProgressReader(source, total, progress)
            while chunk := reader.read(_CHUNK):
                target.write(chunk)
        return True
    bucket_name, name = split_gcs(url)
    bucket = gcs_client().bucket(bucket_name)
    existing = bucket.get_blob(name)
    if existing is not None and existing.size == total and existing.crc32c == local_crc32c:
        log.info("archive already in bucket", url=url, bytes=total)
        return False
    blob = bucket.blob(name, chunk_size=_CHUNK)
    with open(local_path, "rb") as handle:
        reader = _ProgressReader(handle, total, progress)
        # checksum="crc32c" makes the client verify the server's checksum of the whole object.
        blob.upload_from_file(reader, size=total, checksum="crc32c", rewind=False)
    if blob.crc32c != local_crc32c:  # belt and braces: the file changed while it was uploading
        raise OSError(f"uploaded {url} but its CRC32C {blob.crc32c} differs from {local_path}'s {local_crc32c}")
    return True


def _crc32c_b64(local_path: str) -> str:
    """CRC32C of a local file, base64 as GCS reports it."""
    import google_crc32c

    crc = google_crc32c.Checksum()
    with open(local_path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc.update(chunk)
    return base64.b64encode(crc.digest()).decode("ascii")


class _ProgressReader:
    """File wrapper that reports bytes read, so a resumable upload can show progress."""

    def __init__(self, handle: Any, total: int, progress: Callable[[int, int], None] | None) -> None:
        self._handle, self._total, self._progress, self._done = handle, total, progress, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._done += len(chunk)
        if self._progress:
            self._progress(self._done, self._total)
        return chunk

    def tell(self) -> int:
        return self._handle.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._handle.seek(offset, whence)
        self._done = position
        return position
