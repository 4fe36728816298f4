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

import numpy as np
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


def _pil_bytes(image_format: str, mode: str, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=image_format)
    return buffer.getvalue()


def test_images_the_shard_stage_cannot_decode_are_dropped_and_shard_then_succeeds(tmp_path):
    """PIL reads a CMYK JPEG, a GIF and a 1-bit BMP; TensorFlow (the shard stage) does not: skip them here."""
    from pneumonia.data import shard

    entries = minimal_entries()
    unreadable = {
        "chest_xray/train/NORMAL/IM-0810-0001.jpeg": _pil_bytes("JPEG", "CMYK", 1),
        "chest_xray/train/NORMAL/IM-0811-0001.gif": _pil_bytes("GIF", "L", 2),
        "chest_xray/train/NORMAL/IM-0812-0001.bmp": _pil_bytes("BMP", "1", 3),
    }
    entries.update(unreadable)
    entries["chest_xray/train/NORMAL/IM-0813-0001.png"] = _pil_bytes("PNG", "L", 4)  # fine
    archive = write_zip(tmp_path / "in.zip", entries)
    config = config_for(tmp_path / "data", archive, "shard.image_height=32", "shard.image_width=32",
                        "shard.min_shards_per_split=1", "shard.encoding=png")
    marker = run(config)
    reasons = {item["entry"]: item["reason"] for item in marker["dropped"]}
    assert set(reasons) == set(unreadable)
    assert "TensorFlow cannot decode it as the shard stage does" in reasons["chest_xray/train/NORMAL/IM-0810-0001.jpeg"]
    assert "unsupported image format GIF" in reasons["chest_xray/train/NORMAL/IM-0811-0001.gif"]
    assert "unsupported image format BMP" in reasons["chest_xray/train/NORMAL/IM-0812-0001.bmp"]
    assert marker["num_images"] == len(minimal_entries()) + 1

    sharded = shard.run(config)  # every kept file decodes there
    manifest = json.loads((tmp_path / "data" / "splits" / "split.json").read_text())
    expected = sum(1 for row in manifest["rows"] if row["split"] != "unused")
    assert sum(total["num_records"] for total in sharded["splits"].values()) == expected


def test_check_image_runs_the_shard_stage_decode():
    assert archive_lib.check_image(_pil_bytes("PNG", "L", 5)) is None
    assert archive_lib.check_image(_pil_bytes("JPEG", "RGB", 6)) is None
    reason = archive_lib.check_image(_pil_bytes("JPEG", "CMYK", 7))
    assert "TensorFlow cannot decode" in reason and "channels=1" in reason


def test_decompression_bombs_are_dropped(monkeypatch):
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS == archive_lib.MAX_IMAGE_PIXELS <= 100_000_000
    image = jpeg_bytes(width=30, height=20)  # 600 pixels
    monkeypatch.setattr(archive_lib, "MAX_IMAGE_PIXELS", 500)  # the explicit check (PIL only warns here)
    assert "image too large to decode safely: 30x20 = 600 pixels" in archive_lib.check_image(image)
    monkeypatch.setattr(archive_lib, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)  # PIL's own DecompressionBombError (past 2x)
    assert "image too large to decode safely" in archive_lib.check_image(image)


def test_entry_over_max_entry_bytes_is_refused_by_its_declared_size(tmp_path):
    entries = minimal_entries()
    entries["chest_xray/train/NORMAL/IM-0998-0001.jpeg"] = jpeg_bytes(width=160, height=160, seed=998)
    archive = write_zip(tmp_path / "big-entry.zip", entries)
    error = _run_expecting(tmp_path, archive, "entry chest_xray/train/NORMAL/IM-0998-0001.jpeg declares",
                           "data.max_entry_bytes=8000")
    assert "data.max_entry_bytes=8000" in str(error)


def test_inflate_budget_caps_each_entry_on_the_bytes_really_inflated(tmp_path):
    archive = write_zip(tmp_path / "in.zip", {"chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"\0" * 50_000})
    limits = DataConfig(max_entry_bytes=20_000, max_compression_ratio=1e9)
    with zipfile.ZipFile(archive) as zipped:
        with pytest.raises(BadInputError, match="IM-0001-0001.jpeg inflated past data.max_entry_bytes=20000"):
            archive_lib.InflateBudget(limits, str(archive)).read(zipped, zipped.infolist()[0])

    class TrustsTheData:
        """A reader that inflates what the data holds whatever the header says (as a lying header wants)."""

        def open(self, info):
            return io.BytesIO(b"\0" * 50_000)

    liar = zipfile.ZipInfo("chest_xray/train/NORMAL/IM-0002-0001.jpeg")
    liar.file_size = liar.compress_size = 100  # passes every declared-size check
    budget = archive_lib.InflateBudget(limits, "liar.zip")
    with pytest.raises(BadInputError, match=r"IM-0002-0001.jpeg inflated past data.max_entry_bytes=20000 "
                                            r"\(its header declares 100 bytes\)"):
        budget.read(TrustsTheData(), liar)
    assert budget.num_bytes <= 20_000 + 1024 * 1024  # stopped within one read chunk of the cap
