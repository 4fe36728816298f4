"""Small data builders shared by tests: the demo archive, hand-made zips, tiny JPEGs, a config."""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pneumonia.config import PipelineConfig, load_config
from pneumonia.data.demo import encode_jpeg
from pneumonia.data.demo import make_demo_archive as _make_demo_archive


def make_demo_archive(tmp_path: Path, num_images: int = 60, seed: int = 0, label_noise: float = 0.0) -> Path:
    """The synthetic Kaggle-layout zip under tmp_path/raw/ (its truth beside it); 60 images take under a second."""
    out = tmp_path / "raw" / "demo-chest-xray.zip"
    _make_demo_archive(str(out), num_images=num_images, seed=seed, label_noise=label_noise)
    return out


def jpeg_bytes(width: int = 24, height: int = 24, seed: int = 0, rgb: bool = False) -> bytes:
    """A small random JPEG; different seeds give different bytes (so no two count as duplicates)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return encode_jpeg(pixels, rgb, quality=90)


def minimal_entries(num_per_class: int = 4) -> dict[str, bytes]:
    """A valid tiny archive: every class in train/ and test/, two images per patient."""
    entries: dict[str, bytes] = {}
    seed = 0
    for origin, first_patient in (("train", 100), ("test", 500)):
        for k in range(num_per_class):
            patient = first_patient + k // 2
            view = k % 2 + 1
            for name, folder in ((f"IM-{patient:04d}-{view:04d}.jpeg", "NORMAL"),
                                 (f"person{patient}_bacteria_{patient * 10 + view}.jpeg", "PNEUMONIA"),
                                 (f"person{patient + 50}_virus_{patient * 10 + view}.jpeg", "PNEUMONIA")):
                seed += 1
                entries[f"chest_xray/{origin}/{folder}/{name}"] = jpeg_bytes(seed=seed)
    return entries


def write_zip(path: Path, entries: Mapping[str, bytes], symlinks: Mapping[str, str] | None = None,
              stored: Sequence[str] = ()) -> Path:
    """A zip with the given entries; `symlinks` maps entry name -> link target (Unix symlink entries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=(2018, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name, date_time=(2018, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def config_for(root: Path | str, archive: Path | str, *overrides: str) -> PipelineConfig:
    """Defaults plus data.root / data.archive and any `section.key=value` overrides, validated."""
    return load_config(None, [f"data.root={root}", f"data.archive={archive}", *overrides])
