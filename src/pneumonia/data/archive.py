"""Reads the raw Kaggle-style zip safely, entry by entry, without extracting it.

Sorts every entry into: an image candidate (split folder, class, base name), clutter (macOS forks,
.DS_Store, folders, anything outside train/ test/ val/), or a problem to report (unsafe name, symlink,
no class). Reads are bounded by the zip-bomb limits in `data.*`, counted on the bytes really inflated.
"""

from __future__ import annotations

import contextlib
import io
import re
import stat
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from pneumonia import storage
from pneumonia.config import DataConfig
from pneumonia.data import imaging
from pneumonia.errors import BadInputError

ORIGIN_SPLITS = ("train", "test", "val")
# Formats the shard stage's TensorFlow decoders read at every shard.channels: TF decodes BMP and GIF
# only to 3 (or 4) channels, so with the default shard.channels=1 they would fail there.
IMAGE_FORMATS = ("JPEG", "PNG")
# Chest X-rays are at most ~9 M pixels; anything far larger is a decompression bomb, not a film.
# PIL warns past MAX_IMAGE_PIXELS and refuses past twice it; check_image refuses past it.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# The shard stage's decode is checked at this small size: JPEGs then decode at the smallest DCT scale,
# through the same TF ops (imaging.load_resized) the shard writer runs.
_CHECK_SIZE = 16
_READ_CHUNK = 1024 * 1024
# On gs:// every GFile read is an HTTP range request; a large buffer turns zipfile's many small reads
# (header, name, data chunks) into a few big ones when entries are visited in file order.
_BUFFER_BYTES = 16 * 1024 * 1024
# GFile reports a seek or read past the data as these; other OpErrors (network) propagate and are retried.
_GFILE_DATA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError)
LAYOUT_HINT = "expected chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg as in the Kaggle archive"


@dataclass(frozen=True)
class Candidate:
    """A zip entry that sits where an image belongs and names its class."""

    entry: str
    origin_split: str
    class_name: str
    base_name: str
    info: zipfile.ZipInfo

    @property
    def depth(self) -> int:
        return self.entry.count("/")


@dataclass(frozen=True)
class Dropped:
    entry: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"entry": self.entry, "reason": self.reason}


@dataclass
class Listing:
    """What the central directory says, before any entry is inflated."""

    candidates: list[Candidate]
    dropped: list[Dropped]  # problems worth a person's attention
    num_clutter: int  # folders, macOS forks, .DS_Store, files outside train/ test/ val/


def require_archive(path: str) -> None:
    """Bad input, with what to do, when no archive is named or nothing is at the path."""
    if not path:
        raise BadInputError("data.archive is not set: pass --set data.archive=PATH (a local zip or gs:// URL), "
                            "or make a demo archive with python -m pneumonia.data.demo --out PATH")
    if not storage.exists(path):
        raise BadInputError(f"archive {path} does not exist: check data.archive, or make a demo archive with "
                            "python -m pneumonia.data.demo --out PATH")


@contextlib.contextmanager
def open_archive(path: str) -> Iterator[zipfile.ZipFile]:
    """Opens a local or gs:// zip for random access; a missing, non-zip or truncated file is bad input."""
    require_archive(path)
    with storage.open_file(path, "rb") as gfile:
        handle = io.BufferedReader(_RawGFile(gfile), buffer_size=_BUFFER_BYTES)
        head = handle.read(4)
        handle.seek(0)
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, *_GFILE_DATA_ERRORS) as error:
            if head.startswith(b"PK"):
                raise BadInputError(f"archive {path} starts like a zip but cannot be read ({error}): it is probably "
                                    "truncated or damaged; download it again") from None
            raise BadInputError(f"archive {path} is not a zip file (first bytes {head!r}); point data.archive at "
                                "the chest_xray zip") from None
        with archive:
            yield archive


class _RawGFile(io.RawIOBase):
    """The raw-file face of a GFile, so io.BufferedReader can buffer it."""

    def __init__(self, gfile: Any) -> None:
        super().__init__()
        self._gfile = gfile

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._gfile.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._gfile.seek(offset, whence)
        return self._gfile.tell()

    def tell(self) -> int:
        return self._gfile.tell()


def list_entries(archive: zipfile.ZipFile, path: str, limits: DataConfig) -> Listing:
    """Classifies every entry by name and checks the declared sizes against the zip-bomb limits."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise BadInputError(f"archive {path} has {len(infos)} entries, more than data.max_entries="
                            f"{limits.max_entries}; check the archive or raise the limit")
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_uncompressed_bytes:
        raise BadInputError(f"archive {path} declares {declared} uncompressed bytes, more than "
                            f"data.max_uncompressed_bytes={limits.max_uncompressed_bytes}; it may be a zip bomb: "
                            "check its source, or raise the limit if it is genuine")
    candidates: list[Candidate] = []
    dropped: list[Dropped] = []
    num_clutter = 0
    for info in infos:
        verdict = classify(info)
        if verdict is None:
            num_clutter += 1
        elif isinstance(verdict, Dropped):
            dropped.append(verdict)
        else:
            if info.file_size > limits.max_entry_bytes:
                raise BadInputError(f"archive {path}: entry {info.filename} declares {info.file_size} bytes, more "
                                    f"than data.max_entry_bytes={limits.max_entry_bytes}; no X-ray is that large, "
                                    "it may be a zip bomb: check the archive's source, or raise data.max_entry_bytes "
                                    "if it is genuine")
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise BadInputError(f"archive {path}: entry {info.filename} inflates {ratio:.0f}x "
                                    f"({info.compress_size} -> {info.file_size} bytes), more than "
                                    f"data.max_compression_ratio={limits.max_compression_ratio:g}; it looks like a "
                                    "zip bomb: check the archive's source, or raise the limit if it is genuine")
            candidates.append(verdict)
    return Listing(candidates, dropped, num_clutter)


def classify(info: zipfile.ZipInfo) -> Candidate | Dropped | None:
    """Candidate for an image entry, Dropped for a problem to report, None for plain clutter."""
    name = info.filename
    parts = [part for part in name.replace("\\", "/").split("/") if part]
    if info.is_dir() or not parts:
        return None
    base = parts[-1]
    if parts[0] == "__MACOSX" or base.startswith("._") or base == ".DS_Store" or base in ("Thumbs.db",):
        return None
    lowered = [part.lower() for part in parts]
    under_split = any(part in ORIGIN_SPLITS for part in lowered[:-1])
    # Names are never used as output paths (those are built from class + base name), but an entry that
    # tries to leave its folder is hostile or broken either way: say so instead of reading it.
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\x00" in name:
        return Dropped(name, "unsafe entry name (absolute path or '..'); skipped, never written")
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):
        return Dropped(name, "symbolic link; skipped, never followed")
    if not under_split:
        return None
    if base.startswith("."):
        return None
    if len(parts) < 3 or lowered[-3] not in ORIGIN_SPLITS or lowered[-2] not in ("normal", "pneumonia"):
        return Dropped(name, f"not in a <train|test|val>/<NORMAL|PNEUMONIA>/ folder; class unknown ({LAYOUT_HINT})")
    origin_split = lowered[-3]
    if lowered[-2] == "normal":
        return Candidate(name, origin_split, "normal", base, info)
    is_bacteria, is_virus = "bacteria" in base.lower(), "virus" in base.lower()
    if is_bacteria == is_virus:
        return Dropped(name, "PNEUMONIA image whose name says neither 'bacteria' nor 'virus' (or both); "
                             "class unknown, not guessed")
    return Candidate(name, origin_split, "bacteria" if is_bacteria else "virus", base, info)


class InflateBudget:
    """Counts the bytes really inflated, so a header that lies about sizes cannot exhaust memory."""

    def __init__(self, limits: DataConfig, path: str) -> None:
        self.limits, self.path, self.num_bytes = limits, path, 0

    def read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        """The entry's bytes; BadInputError past the limits, zipfile/zlib errors for a damaged entry.

        The caps apply to the bytes really inflated, whatever the header declares.
        """
        ratio_cap = int(max(info.compress_size, 1) * self.limits.max_compression_ratio)
        buffer, num_read = io.BytesIO(), 0  # getvalue() hands over the buffer: no second copy
        with archive.open(info) as stream:
            while chunk := stream.read(_READ_CHUNK):
                num_read += len(chunk)
                self.num_bytes += len(chunk)
                if num_read > self.limits.max_entry_bytes:
                    raise BadInputError(f"archive {self.path}: entry {info.filename} inflated past "
                                        f"data.max_entry_bytes={self.limits.max_entry_bytes} (its header declares "
                                        f"{info.file_size} bytes); it looks like a zip bomb: check the archive's "
                                        "source, or raise data.max_entry_bytes if it is genuine")
                if num_read > ratio_cap:
                    raise BadInputError(f"archive {self.path}: entry {info.filename} inflated past "
                                        f"{ratio_cap} bytes (data.max_compression_ratio="
                                        f"{self.limits.max_compression_ratio:g}); it looks like a zip bomb")
                if self.num_bytes > self.limits.max_uncompressed_bytes:
                    raise BadInputError(f"archive {self.path}: reading {info.filename} took the inflated total past "
                                        f"data.max_uncompressed_bytes={self.limits.max_uncompressed_bytes}; "
                                        "it looks like a zip bomb")
                buffer.write(chunk)
        return buffer.getvalue()


READ_ERRORS: tuple[type[BaseException], ...] = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
                                                 NotImplementedError, RuntimeError, *_GFILE_DATA_ERRORS)


def check_image(data: bytes) -> str | None:
    """None when the bytes decode fully as an image, with PIL and with the shard stage's TF ops; else why not."""
    if not data:
        return "empty file"
    try:
        # Image.open refuses past 2 x MAX_IMAGE_PIXELS (DecompressionBombError) and only warns past it, so the
        # size is checked here too, before any pixel is decoded. (No warnings.catch_warnings(): it is not
        # thread-safe, and this runs in the preprocess writer threads.)
        with Image.open(io.BytesIO(data)) as picture:
            num_pixels = picture.width * picture.height
            if num_pixels > MAX_IMAGE_PIXELS:
                return (f"image too large to decode safely: {picture.width}x{picture.height} = {num_pixels} "
                        f"pixels, more than {MAX_IMAGE_PIXELS} (a decompression bomb, not an X-ray)")
            picture.verify()
        with Image.open(io.BytesIO(data)) as picture:
            image_format = picture.format
            picture.load()  # verify() skips pixel data; load() catches truncated JPEGs
    except UnidentifiedImageError:
        return "not an image file (no decoder recognises it)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"image too large to decode safely (a decompression bomb, not an X-ray): {error}"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return f"image does not decode: {error}"
    if image_format not in IMAGE_FORMATS:
        return (f"unsupported image format {image_format} (expected one of {', '.join(IMAGE_FORMATS)}, which the shard "
                "stage's TensorFlow decoders read at every shard.channels); convert it to PNG or JPEG")
    return check_tf_decode(data)


def check_tf_decode(data: bytes) -> str | None:
    """None when the shard stage's own decode (imaging.load_resized, 1 and 3 channels) reads the bytes."""
    for channels in (1, 3):
        try:
            _tf_decoder(channels)(tf.constant(data, tf.string))
        except tf.errors.InvalidArgumentError as error:
            detail = _tf_error_detail(error.message)
            return (f"TensorFlow cannot decode it as the shard stage does (channels={channels}): {detail}; "
                    "PIL reads it (a CMYK JPEG or an unusual variant?): convert it to a grayscale PNG or JPEG")
    return None


def _tf_error_detail(message: str) -> str:
    """The op's own words from a graph-mode error (without the traceback and node names)."""
    for line in message.splitlines():
        line = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", line).strip(" \t[]")
        if line and not line.startswith(("Graph execution error", "Detected at node", "File ")):
            return line.rstrip(".")
    return "decode failed"


_TF_DECODERS: dict[int, Any] = {}
_TF_DECODERS_LOCK = threading.Lock()


def _tf_decoder(channels: int):  # noqa: ANN202
    """The shard stage's decode as one traced graph per channel count, traced once under a lock:
    the checking threads would otherwise each trace it on first use."""
    with _TF_DECODERS_LOCK:
        if channels not in _TF_DECODERS:
            @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
            def decode(data: tf.Tensor) -> tf.Tensor:
                # Either fit decodes the same bytes: whether it decodes is all this check asks.
                return imaging.load_resized(data, _CHECK_SIZE, _CHECK_SIZE, channels, fit="pad")[0]

            _TF_DECODERS[channels] = decode.get_concrete_function()
        return _TF_DECODERS[channels]


def describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}"
