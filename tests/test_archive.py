"""Bad archives: each is a clear BadInputError (exit 2) or a reported, skipped file; never a marker on failure."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from data_helpers import config_for, jpeg_bytes, make_demo_archive, minimal_entries, write_zip

from pneumonia.config import DataConfig
from pneumonia.data import archive as archive_lib
from pneumonia.data.preprocess import run
from pneumonia.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]


def _assert_nothing_done(root: Path) -> None:
    assert not (root / "interim" / "_SUCCESS.json").exists()
    assert not (root / "splits" / "split.json").exists()
    if root.exists():
        assert [p.name for p in root.iterdir() if p.name.startswith(".preprocess-tmp-")] == []


def _run_expecting(tmp_path: Path, archive: Path | str, match: str, *overrides: str) -> BadInputError:
    root = tmp_path / "data"
    with pytest.raises(BadInputError, match=match) as caught:
        run(config_for(root, archive, *overrides))
    _assert_nothing_done(root)
    return caught.value


def _dropped(tmp_path: Path, entries: dict, **zip_args) -> dict[str, str]:
    archive = write_zip(tmp_path / "in.zip", entries, **zip_args)
    marker = run(config_for(tmp_path / "data", archive))
    return {item["entry"]: item["reason"] for item in marker["dropped"]}


def test_missing_archive(tmp_path):
    _run_expecting(tmp_path, tmp_path / "nope.zip", "nope.zip does not exist")


def test_no_archive_set_and_none_in_raw(tmp_path):
    _run_expecting(tmp_path, "", "data.archive is not set")


def test_not_a_zip(tmp_path):
    path = tmp_path / "notes.zip"
    path.write_text("just text")
    _run_expecting(tmp_path, path, "notes.zip is not a zip file")


def test_truncated_zip(tmp_path):
    full = make_demo_archive(tmp_path, num_images=20).read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(full[: len(full) // 2])
    _run_expecting(tmp_path, path, "cut.zip starts like a zip .* truncated")


def test_unsafe_names_and_symlinks_are_skipped_and_never_written(tmp_path):
    entries = minimal_entries()
    evil = jpeg_bytes(seed=999)
    entries["chest_xray/train/NORMAL/../../../../evil.jpeg"] = evil
    entries["/abs/chest_xray/train/NORMAL/IM-0900-0001.jpeg"] = jpeg_bytes(seed=998)
    dropped = _dropped(tmp_path, entries, symlinks={"chest_xray/train/NORMAL/IM-0901-0001.jpeg": "/etc/passwd"})
    assert "unsafe entry name" in dropped["chest_xray/train/NORMAL/../../../../evil.jpeg"]
    assert "unsafe entry name" in dropped["/abs/chest_xray/train/NORMAL/IM-0900-0001.jpeg"]
    assert "symbolic link" in dropped["chest_xray/train/NORMAL/IM-0901-0001.jpeg"]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == evil]
    assert written == []
    manifest = json.loads((tmp_path / "data" / "splits" / "split.json").read_text())
    assert not any("IM-0901" in row["path"] or "IM-0900" in row["path"] for row in manifest["rows"])


def _bomb_entries() -> dict[str, bytes]:
    entries = minimal_entries()
    entries["chest_xray/train/NORMAL/IM-0999-0001.jpeg"] = b"\0" * (4 * 1024 * 1024)
    return entries


def test_zip_bomb_by_compression_ratio(tmp_path):
    archive = write_zip(tmp_path / "bomb.zip", _bomb_entries())
    error = _run_expecting(tmp_path, archive, "IM-0999-0001.jpeg inflates")
    assert "data.max_compression_ratio" in str(error)


def test_zip_bomb_by_total_declared_size(tmp_path):
    archive = write_zip(tmp_path / "big.zip", minimal_entries())
    _run_expecting(tmp_path, archive, "data.max_uncompressed_bytes=10000", "data.max_uncompressed_bytes=10000")


def test_inflated_bytes_are_counted_not_just_declared(tmp_path):
    archive = write_zip(tmp_path / "in.zip", {"chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"\0" * 50_000})
    with zipfile.ZipFile(archive) as zipped:
        info = zipped.infolist()[0]
        budget = archive_lib.InflateBudget(DataConfig(max_compression_ratio=1e9), str(archive))
        assert len(budget.read(zipped, info)) == 50_000
        strict = archive_lib.InflateBudget(DataConfig(max_uncompressed_bytes=20_000, max_compression_ratio=1e9),
                                           str(archive))
        with pytest.raises(BadInputError, match="data.max_uncompressed_bytes=20000"):
            strict.read(zipped, info)


def test_header_that_understates_the_size_is_reported_as_damaged(tmp_path):
    """A central directory that lies (declares 100 bytes) passes the ratio check; reading must not trust it."""
    entries = minimal_entries()
    liar = "chest_xray/train/NORMAL/IM-0777-0001.jpeg"
    entries[liar] = jpeg_bytes(seed=777)
    data = bytearray(write_zip(tmp_path / "raw.zip", entries).read_bytes())
    name = liar.encode()
    central = data.index(b"PK\x01\x02")  # central directory records
    while data[central + 46: central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, 100)  # uncompressed size field
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(data))
    marker = run(config_for(tmp_path / "data", archive))
    reasons = {item["entry"]: item["reason"] for item in marker["dropped"]}
    assert "damaged zip entry" in reasons[liar]
    assert not any("IM-0777" in path.name for path in (tmp_path / "data").rglob("*"))


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_split_folder(tmp_path, missing):
    entries = {name: data for name, data in minimal_entries().items() if f"/{missing}/" not in name}
    archive = write_zip(tmp_path / "in.zip", entries)
    _run_expecting(tmp_path, archive, f"no usable image under a {missing}/ folder")


def test_empty_class(tmp_path):
    entries = {name: data for name, data in minimal_entries().items() if "virus" not in name}
    archive = write_zip(tmp_path / "in.zip", entries)
    _run_expecting(tmp_path, archive, "no usable image of class virus")


def test_class_left_empty_by_corrupt_files(tmp_path):
    entries = {name: (data[:40] if "virus" in name else data) for name, data in minimal_entries().items()}
    archive = write_zip(tmp_path / "in.zip", entries)
    error = _run_expecting(tmp_path, archive, "class virus")
    assert "image does not decode" in str(error)


def test_bad_files_are_reported_and_skipped(tmp_path):
    entries = minimal_entries()
    good = jpeg_bytes(seed=4242)
    bad = {
        "chest_xray/train/NORMAL/IM-0800-0001.jpeg": good[: len(good) // 2],  # truncated JPEG
        "chest_xray/train/NORMAL/IM-0801-0001.jpeg": b"",
        "chest_xray/train/NORMAL/notes.txt": b"radiologist notes, not an image",
        "chest_xray/train/PNEUMONIA/person9_12.jpeg": jpeg_bytes(seed=4243),  # no cause in the name
        "chest_xray/train/NORMAL/extra/IM-0802-0001.jpeg": jpeg_bytes(seed=4244),  # class folder unknown
    }
    entries.update(bad)
    entries["chest_xray/train/NORMAL/IM-0803-0001.jpeg"] = jpeg_bytes(seed=4245, rgb=True)  # RGB is fine
    dropped = _dropped(tmp_path, entries)
    assert set(dropped) == set(bad)
    assert "image does not decode" in dropped["chest_xray/train/NORMAL/IM-0800-0001.jpeg"]
    assert dropped["chest_xray/train/NORMAL/IM-0801-0001.jpeg"] == "empty file"
    assert "not an image" in dropped["chest_xray/train/NORMAL/notes.txt"]
    assert "neither 'bacteria' nor 'virus'" in dropped["chest_xray/train/PNEUMONIA/person9_12.jpeg"]
    assert "class unknown" in dropped["chest_xray/train/NORMAL/extra/IM-0802-0001.jpeg"]
    manifest = json.loads((tmp_path / "data" / "splits" / "split.json").read_text())
    assert len(manifest["rows"]) == len(minimal_entries()) + 1
    assert any(row["path"].endswith("IM-0803-0001.jpeg") for row in manifest["rows"])


def test_same_name_with_different_bytes_keeps_the_shallow_copy(tmp_path):
    entries = minimal_entries()
    entries["chest_xray/chest_xray/train/NORMAL/IM-0100-0001.jpeg"] = jpeg_bytes(seed=5000)
    dropped = _dropped(tmp_path, entries)
    assert "same name as chest_xray/train/NORMAL/IM-0100-0001.jpeg" in dropped[
        "chest_xray/chest_xray/train/NORMAL/IM-0100-0001.jpeg"]


def test_check_image_reasons():
    assert archive_lib.check_image(jpeg_bytes()) is None
    assert archive_lib.check_image(b"") == "empty file"
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("L", (8, 8)).save(buffer, format="TIFF")
    assert "unsupported image format TIFF" in archive_lib.check_image(buffer.getvalue())


@pytest.mark.parametrize(("case", "expected"), [("missing", "does not exist"), ("not_zip", "is not a zip file")])
def test_entrypoint_exits_2_with_the_reason_on_stderr(tmp_path, case, expected):
    archive = tmp_path / "input.zip"
    if case == "not_zip":
        archive.write_bytes(b"%PDF-1.4 not a zip")
    command = [sys.executable, str(REPO / "jobs" / "preprocess.py"), "--config", str(REPO / "jobs/configs/demo.yaml"),
               "--set", f"data.root={tmp_path / 'data'}", "--set", f"data.archive={archive}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "LOG_FORMAT": "json"})
    assert done.returncode == 2
    assert str(archive) in done.stderr and expected in done.stderr
    _assert_nothing_done(tmp_path / "data")
