"""A synthetic chest X-ray archive in the exact Kaggle layout, clutter included, deterministic from a seed.

Tests, laptops and `make train-local` use it instead of the 1.2 GB real archive. Each class has a
pattern a small CNN learns at 64x64: normal = two clear dark lungs; bacteria = one large bright
opacity in one lung; virus = many bright streaks across both lungs. Films have the real archive's
per-class shapes (normal films are squarer than pneumonia ones), and some patients' films are all
harder to read (fainter patterns), so films of one patient are correlated as real ones are.

Known answers, for tests of the model and its report:
- `--label-noise RATE` files a share RATE of the films (exactly, per class) under one of the two
  other classes, drawn from the seed; the film keeps its true class's pattern. A perfect model then
  scores 1 - RATE and is right to say 1 - RATE for its top class. `<archive>.truth.json` lists every
  film: archive path, true class, filed class, patient, difficulty, moved or not.
- `--shortcut CLASS` plants a shortcut: that class's films look like another class's (normal's, or
  bacteria's for normal) and differ only by a marker (a bright square, or burned-in "L", "R",
  "PORTABLE" as on real films) in a corner or along an edge (`--marker`, `--marker-place`). A model
  reaches a high kappa by looking at it; the evaluate stage's shortcut check must say so.
- `--aspect-only`: every film shows the same (normal) pattern; the classes differ only in their
  films' aspect ratio, the cue a letterboxing resize leaks (docs/shortcuts.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# The real archive's class mix: about 27 % normal, 48 % bacterial, 25 % viral.
CLASS_MIX = {"normal": 0.27, "bacteria": 0.48, "virus": 0.25}
TEST_FRACTION = 0.20  # of each class's images; the real test/ holds ~11 %, more here so kappa means something
RGB_FRACTION = 0.04
DUPLICATE_FRACTION = 0.10  # of train images also copied under the nested chest_xray/chest_xray/
BOTH_CAUSES_FRACTION = 0.08  # virus patients whose personN id also has bacteria images, as in the real archive
_ZIP_TIME = (2018, 1, 1, 0, 0, 0)  # fixed so the same seed gives a byte-identical zip
# Film width / height per class in the real Kaggle archive (measured on all 5,856 films): median and
# 10th-90th percentile. Normal films are squarer, so a resize that letterboxes tells the class by the
# bars' shape. Drawn log-normal with the median and the mean log-spread of the two percentiles.
ASPECT_RATIO = {"normal": (1.21, 1.07, 1.39), "bacteria": (1.49, 1.24, 1.84), "virus": (1.51, 1.24, 1.84)}
_Z90 = 1.2816  # the standard normal's 90th percentile
# Real films span 399-2,890 px wide and 140-2,570 px high (`real_sizes=True` draws heights
# log-uniform there, the width following from the aspect ratio). The default draws heights of
# 150-300 px: the films' shapes stay real, 300 films render in seconds, and a 64-256 px shard still
# shrinks them.
REAL_WIDTH_PX, REAL_HEIGHT_PX = (399, 2890), (140, 2570)
DEMO_HEIGHT_PX = (150, 300)
# Patients whose films are all harder to read: their patterns are drawn fainter (scaled by a factor
# drawn once per patient from HARD_STRENGTH), still the class's pattern.
HARD_PATIENT_FRACTION = 0.25
HARD_STRENGTH = (0.55, 0.8)
# The marker's size and its distance from the edge, as fractions of the film's shorter side, inside
# the central part a crop to a square keeps (the collimated field: a marker a resize cuts away is
# no shortcut). Inside the outer 15 % the shortcut check calls the border, as a real "L"/"R" sits.
MARKER_SIZE = 0.09
MARKER_INSET = 0.03
MARKER_KINDS = ("square", "L", "R", "PORTABLE")
MARKER_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
MARKER_EDGES = ("top", "bottom", "left", "right")
# "upper": a random upper corner per film (the default); the rest: always that corner or edge's middle.
MARKER_PLACES = ("upper", *MARKER_CORNERS, *MARKER_EDGES)
TRUTH_SUFFIX = ".truth.json"
TRUTH_VERSION = 1
_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 94


@dataclass(frozen=True)
class Marker:
    """A planted shortcut's marker: what it is and where it sits."""

    kind: str = "square"  # one of MARKER_KINDS: a bright square or burned-in letters
    place: str = "upper"  # one of MARKER_PLACES

    def __post_init__(self) -> None:
        if self.kind not in MARKER_KINDS:
            raise ValueError(f"marker kind {self.kind!r} is not one of {', '.join(MARKER_KINDS)}")
        if self.place not in MARKER_PLACES:
            raise ValueError(f"marker place {self.place!r} is not one of {', '.join(MARKER_PLACES)}")


@dataclass(frozen=True)
class DemoImage:
    origin_split: str  # train / test / val: the folder in the archive
    class_name: str  # the class it is filed under (folder and name): the label a model is given
    patient: str  # the patient its name says (split.patient_id)
    name: str  # file name as in the real archive
    true_class: str = ""  # the pattern drawn; differs from class_name for films moved by label noise
    true_patient: str = ""  # whose film it is (a moved film may be filed under another name family)
    difficulty: float = 1.0  # the pattern's strength, shared by a patient's films (1: plain, lower: fainter)

    @property
    def entry(self) -> str:
        folder = "NORMAL" if self.class_name == "normal" else "PNEUMONIA"
        return f"chest_xray/{self.origin_split}/{folder}/{self.name}"

    @property
    def moved(self) -> bool:
        return self.class_name != self.true_class


def plan_images(num_images: int, seed: int, label_noise: float = 0.0,
                hard_patient_fraction: float = HARD_PATIENT_FRACTION) -> list[DemoImage]:
    """Patients, their images' names and their archive folder; test/ and val/ patients are not in train/.

    Patients and folders are planned by true class; then `label_noise` of each class's films are
    filed under one of the two other classes (uniformly), each in its patient's folder: under the
    same personN for bacteria <-> virus, under a name of the other family, one per patient, otherwise.
    """
    rng = np.random.default_rng(seed)
    num_normal = round(num_images * CLASS_MIX["normal"])
    num_bacteria = round(num_images * CLASS_MIX["bacteria"])
    targets = {"normal": num_normal, "bacteria": num_bacteria, "virus": num_images - num_normal - num_bacteria}
    ids = iter(rng.permutation(np.arange(1, 20 * num_images + 100)))
    # Each group is one patient: (class, patient id, number of images). Several images per patient.
    groups: dict[str, list[list]] = {}
    for class_name, target in targets.items():
        groups[class_name] = []
        left = target
        while left > 0:
            count = int(min(left, rng.integers(1, 5)))
            groups[class_name].append([int(next(ids)), count])
            left -= count
    # Some personN ids carry both bacteria and virus images in the real archive: reuse a bacteria id.
    num_shared = int(len(groups["virus"]) * BOTH_CAUSES_FRACTION)
    for group, donor in zip(groups["virus"][:num_shared], groups["bacteria"][:num_shared], strict=False):
        group[0] = donor[0]
    # Origin folders are chosen per patient id, so a shared id lands in one folder for both causes.
    origin_of: dict[tuple[str, int], str] = {}
    for class_name in ("normal", "bacteria"):
        family = "normal" if class_name == "normal" else "person"
        order = list(rng.permutation(len(groups[class_name])))
        num_test_images = round(targets[class_name] * TEST_FRACTION)
        num_val_patients = 1 if targets[class_name] >= 20 else 0  # val/ is tiny, like the real one
        seen = 0
        for rank, index in enumerate(order):
            patient_id, count = groups[class_name][index]
            if rank < num_val_patients:
                origin = "val"
            elif seen < num_test_images:
                origin = "test"
                seen += count
            else:
                origin = "train"
            origin_of[(family, patient_id)] = origin
    num_virus_test_images = round(targets["virus"] * TEST_FRACTION)
    num_virus_val = 1 if targets["virus"] >= 20 else 0
    seen = 0
    for rank, index in enumerate(rng.permutation(len(groups["virus"]))):
        patient_id, count = groups["virus"][index]
        if ("person", patient_id) in origin_of:
            continue
        if rank < num_virus_val:
            origin_of[("person", patient_id)] = "val"
        elif seen < num_virus_test_images:
            origin_of[("person", patient_id)] = "test"
            seen += count
        else:
            origin_of[("person", patient_id)] = "train"

    # Difficulty and label noise each draw from their own stream, so neither shifts the other draws.
    difficulty_rng = np.random.default_rng([seed, 1])
    difficulty_of: dict[str, float] = {}
    noise_rng = np.random.default_rng([seed, 2])
    alias_of: dict[tuple[str, str], int] = {}  # (true patient, filed family) -> the other family's id

    def alias(true_patient: str, family: str) -> int:
        return alias_of.setdefault((true_patient, family), int(next(ids)))

    films = []  # (true class, family, patient id, true patient)
    for class_name in ("normal", "bacteria", "virus"):
        for patient_id, count in groups[class_name]:
            if class_name == "normal":
                prefix = "NORMAL2-IM" if patient_id % 2 else "IM"
                true_patient = f"{prefix}-{patient_id:04d}"
            else:
                true_patient = f"person{patient_id}"
            if true_patient not in difficulty_of:
                hard = difficulty_rng.random() < hard_patient_fraction
                difficulty_of[true_patient] = round(float(difficulty_rng.uniform(*HARD_STRENGTH)), 3) if hard else 1.0
            family = "normal" if class_name == "normal" else "person"
            films += [(class_name, family, patient_id, true_patient)] * count
    filed = [film[0] for film in films]
    for class_name in targets:
        members = [i for i, film in enumerate(films) if film[0] == class_name]
        others = [name for name in targets if name != class_name]
        for i in noise_rng.choice(members, size=round(label_noise * len(members)), replace=False):
            filed[i] = others[int(noise_rng.integers(0, 2))]

    images: list[DemoImage] = []
    counter = {"bacteria": 0, "virus": 0}
    views: dict[str, int] = {}
    for (true_class, family, patient_id, true_patient), filed_class in zip(films, filed, strict=True):
        origin = origin_of[(family, patient_id)]
        difficulty = difficulty_of[true_patient]
        if filed_class == "normal":
            number = patient_id if family == "normal" else alias(true_patient, "normal")
            prefix = "NORMAL2-IM" if number % 2 else "IM"
            patient = f"{prefix}-{number:04d}"
            views[patient] = k = views.get(patient, 0) + 1
            # A few real names carry a second view number: NORMAL2-IM-1427-0001-0002.jpeg.
            extra = "-0002" if prefix == "NORMAL2-IM" and k == 2 and number % 3 == 0 else ""
            name = f"{patient}-{k:04d}{extra}.jpeg"
        else:
            number = patient_id if family == "person" else alias(true_patient, "person")
            patient = f"person{number}"
            counter[filed_class] += 1
            name = f"{patient}_{filed_class}_{counter[filed_class]}.jpeg"
        images.append(DemoImage(origin, filed_class, patient, name, true_class, true_patient, difficulty))
    return images


def shortcut_lookalike(class_name: str) -> str:
    """The class whose pattern a planted-shortcut class is drawn with."""
    return "bacteria" if class_name == "normal" else "normal"


def film_size(class_name: str, rng: np.random.Generator, real_sizes: bool = False) -> tuple[int, int]:
    """(height, width) of one film: the class's real aspect ratio; real or scaled-down heights."""
    median, low, high = ASPECT_RATIO[class_name]
    spread = (np.log(high / median) + np.log(median / low)) / 2 / _Z90
    aspect = float(np.exp(rng.normal(np.log(median), spread)))
    if real_sizes:
        # Heights log-uniform over the real range, narrowed so the width stays in its real range too.
        low_px = max(REAL_HEIGHT_PX[0], REAL_WIDTH_PX[0] / aspect)
        high_px = min(REAL_HEIGHT_PX[1], REAL_WIDTH_PX[1] / aspect)
        height = float(np.exp(rng.uniform(np.log(low_px), np.log(high_px))))
    else:
        height = float(np.exp(rng.uniform(*np.log(DEMO_HEIGHT_PX))))
    return round(height), round(height * aspect)


def render_image(class_name: str, rng: np.random.Generator, marker: Marker | bool | None = None, *,
                 strength: float = 1.0, size: tuple[int, int] | None = None, shape_of: str | None = None,
                 real_sizes: bool = False) -> np.ndarray:
    """One synthetic radiograph (uint8 HxW): body, two lungs, spine, the class's pattern at `strength`.

    The film's shape is drawn from `shape_of`'s real aspect ratios (default: `class_name`'s) unless
    `size` gives it. The chest scales with the film's height and sits in its middle: a wider film
    shows more of the surroundings, not a wider chest, so a centre crop to a square sees the same
    anatomy whatever the film's shape. `marker` (True: the default Marker) draws a planted marker.
    """
    height, width = size or film_size(shape_of or class_name, rng, real_sizes)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), 15.0, np.float32)
    cx, cy = width / 2 + height * rng.uniform(-0.03, 0.03), height * rng.uniform(0.47, 0.53)
    body = ((xx - cx) / (height * rng.uniform(0.48, 0.58))) ** 2 + ((yy - cy) / (0.52 * height)) ** 2 <= 1.0
    image[body] = 115.0
    lungs = []
    for side in (-1, 1):
        lx = cx + side * height * rng.uniform(0.19, 0.23)
        ly = cy - height * rng.uniform(0.02, 0.06)
        rx, ry = height * rng.uniform(0.12, 0.15), height * rng.uniform(0.25, 0.30)
        lungs.append((lx, ly, rx, ry))
        inside = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2
        image -= 70.0 * np.clip(1.2 - inside, 0.0, 0.2) / 0.2  # soft-edged dark lung field
    spine = np.abs(xx - cx) < height * 0.04
    image[spine & body] += 45.0

    if class_name == "bacteria":
        lx, ly, rx, ry = lungs[int(rng.integers(0, 2))]
        bx, by = lx + rng.uniform(-0.3, 0.3) * rx, ly + rng.uniform(-0.4, 0.4) * ry
        radius = rx * rng.uniform(0.6, 0.85)
        blob = np.exp(-(((xx - bx) ** 2 + ((yy - by) / 1.3) ** 2) / (2 * radius**2)))
        image += strength * rng.uniform(140, 180) * blob
    elif class_name == "virus":
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        thickness = max(2, round(height / 75))
        for lx, ly, rx, ry in lungs:
            for _ in range(int(rng.integers(18, 30))):
                x0, y0 = lx + rng.uniform(-0.8, 0.8) * rx, ly + rng.uniform(-0.85, 0.85) * ry
                angle, length = rng.uniform(0, np.pi), height * rng.uniform(0.04, 0.11)
                x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
                draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(110, 160)), width=thickness)
        image += strength * np.asarray(layer.filter(ImageFilter.GaussianBlur(1)), np.float32)

    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
    image = image * gain + offset + rng.normal(0.0, rng.uniform(5, 10), image.shape)
    if marker:
        _draw_marker(image, marker if isinstance(marker, Marker) else Marker(), rng)
    return np.clip(image, 0, 255).astype(np.uint8)


def marker_box(height: int, width: int, place: str, box_height: int, box_width: int) -> tuple[int, int]:
    """(top, left) of a marker of the given size at `place` (a corner or an edge's middle), inset from the
    edges of the film's central square (what a centre crop to a square keeps)."""
    side = min(height, width)
    top0, left0 = (height - side) // 2, (width - side) // 2
    inset = round(MARKER_INSET * side)
    vertical = {"top": top0 + inset, "bottom": top0 + side - inset - box_height,
                "middle": top0 + (side - box_height) // 2}
    horizontal = {"left": left0 + inset, "right": left0 + side - inset - box_width,
                  "middle": left0 + (side - box_width) // 2}
    if place in MARKER_CORNERS:
        row, column = place.split("-")
    else:
        row = place if place in ("top", "bottom") else "middle"
        column = place if place in ("left", "right") else "middle"
    return vertical[row], horizontal[column]


def _draw_marker(image: np.ndarray, marker: Marker, rng: np.random.Generator) -> None:
    """Burns the marker into `image` (float HxW) in place: a bright square, or bright letters."""
    height, width = image.shape
    side = min(height, width)
    place = marker.place if marker.place != "upper" else ("top-left" if rng.random() < 0.5 else "top-right")
    brightness = rng.uniform(225, 250)
    size = max(4, round(MARKER_SIZE * side))
    if marker.kind == "square":
        top, left = marker_box(height, width, place, size, size)
        image[top:top + size, left:left + size] = brightness
        return
    # Letters as a technician's marker burns them in: bright, about the square's height; along a
    # side edge a word runs vertically, as on real films, so it stays inside the border band.
    font = ImageFont.load_default(size=size)
    stroke = max(1, round(size / 12))  # bold, as burned-in letters are: thin strokes vanish in a 64 px shard
    x0, y0, x1, y1 = font.getbbox(marker.kind, stroke_width=stroke)
    text = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(text).text((-x0, -y0), marker.kind, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    if place in ("left", "right") and len(marker.kind) > 1:
        text = text.rotate(90, expand=True)
    glyphs = np.asarray(text, np.float32) / 255.0
    top, left = marker_box(height, width, place, *glyphs.shape)
    region = image[top:top + glyphs.shape[0], left:left + glyphs.shape[1]]
    region[...] = region * (1.0 - glyphs) + brightness * glyphs


def encode_jpeg(pixels: np.ndarray, rgb: bool, quality: int = 85) -> bytes:
    """8-bit grayscale pixels -> JPEG bytes, stored as RGB when `rgb` (as a few real films are)."""
    picture = Image.fromarray(pixels, "L")
    if rgb:
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_archive(num_images: int = 300, seed: int = 0, shortcut: str | None = None, **options: Any) -> bytes:
    """The zip's bytes (see build_archive_with_truth for the options)."""
    return build_archive_with_truth(num_images, seed, shortcut, **options)[0]


def build_archive_with_truth(num_images: int = 300, seed: int = 0, shortcut: str | None = None, *,
                             label_noise: float = 0.0, hard_patient_fraction: float = HARD_PATIENT_FRACTION,
                             marker: Marker = Marker(), aspect_only: bool = False,
                             real_sizes: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The zip's bytes (images, directory entries, .DS_Store, __MACOSX/ forks, a nested partial copy)
    and its truth: every film's archive path, true and filed class, patient and difficulty.

    `shortcut` names a class told apart only by `marker`; `label_noise` the share of each class's
    films filed under another class; `aspect_only` draws every film with the normal pattern, so only
    the films' shapes tell the classes (see the module's docstring).
    """
    if num_images < 10:
        raise ValueError(f"num_images={num_images} is too small: use at least 10 so every class gets images")
    if shortcut is not None and shortcut not in CLASS_MIX:
        raise ValueError(f"shortcut={shortcut!r} is not a class: use one of {', '.join(CLASS_MIX)}")
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise={label_noise} is not a rate in [0, 0.5]: above that a wrong class is "
                         "likelier than the true one")
    if not 0.0 <= hard_patient_fraction <= 1.0:
        raise ValueError(f"hard_patient_fraction={hard_patient_fraction} is not a fraction in [0, 1]")
    images = plan_images(num_images, seed, label_noise, hard_patient_fraction)
    rng = np.random.default_rng(seed + 1)
    payloads = []
    for image in images:
        planted = image.true_class == shortcut
        pattern = shortcut_lookalike(image.true_class) if planted else image.true_class
        if aspect_only:
            pattern = "normal"
        pixels = render_image(pattern, rng, marker if planted else None, strength=image.difficulty,
                              shape_of=image.true_class, real_sizes=real_sizes)
        payloads.append(encode_jpeg(pixels, rgb=rng.random() < RGB_FRACTION))
    truth = {"version": TRUTH_VERSION, "num_images": num_images, "seed": seed, "label_noise": label_noise,
             "hard_patient_fraction": hard_patient_fraction, "shortcut": shortcut,
             "marker": {"kind": marker.kind, "place": marker.place} if shortcut else None,
             "aspect_only": aspect_only, "real_sizes": real_sizes,
             "num_moved": sum(image.moved for image in images),
             "films": [{"path": image.entry, "true_class": image.true_class, "filed_class": image.class_name,
                        "patient": image.patient, "true_patient": image.true_patient,
                        "difficulty": image.difficulty, "moved": image.moved}
                       for image in sorted(images, key=lambda one: one.entry)]}
    entries: list[tuple[str, bytes]] = []
    folders = ["chest_xray/"] + [f"chest_xray/{split}/" for split in ("test", "train", "val")]
    folders += [f"chest_xray/{split}/{cls}/" for split in ("test", "train", "val") for cls in ("NORMAL", "PNEUMONIA")]
    entries += [(folder, b"") for folder in folders]
    order = sorted(range(len(images)), key=lambda i: images[i].entry)
    entries += [(images[i].entry, payloads[i]) for i in order]
    # The nested duplicate: same bytes under chest_xray/chest_xray/, as in some versions of the archive.
    for i in order:
        if images[i].origin_split == "val" or (images[i].origin_split == "train" and rng.random() < DUPLICATE_FRACTION):
            entries.append(("chest_xray/" + images[i].entry, payloads[i]))
    ds_store = b"\x00\x00\x00\x01Bud1" + bytes(rng.integers(0, 256, 200, dtype=np.uint8))
    entries += [("chest_xray/.DS_Store", ds_store), ("chest_xray/train/.DS_Store", ds_store),
                ("chest_xray/test/.DS_Store", ds_store)]
    entries += [("__MACOSX/", b""), ("__MACOSX/chest_xray/._.DS_Store", _APPLEDOUBLE)]
    for i in order:
        folder, _, name = images[i].entry.rpartition("/")
        entries.append((f"__MACOSX/{folder}/._{name}", _APPLEDOUBLE))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.create_system = 3
            info.external_attr = ((0o40755 if name.endswith("/") else 0o100644) << 16) | (0x10 if name.endswith("/") else 0)
            info.compress_type = zipfile.ZIP_STORED if name.endswith("/") else zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=6)
    return buffer.getvalue(), truth


def truth_path(archive: str) -> str:
    """Where the truth sidecar of the archive at `archive` lies: beside it."""
    return archive + TRUTH_SUFFIX


def make_demo_archive(out: str, num_images: int = 300, seed: int = 0, shortcut: str | None = None,
                      **options: Any) -> str:
    """Writes the demo zip to `out` (local path or gs:// URL) and its truth to `truth_path(out)`, each
    through a temporary name (the truth first, so an archive never lies beside another's truth);
    returns `out`. Options as build_archive_with_truth."""
    data, truth = build_archive_with_truth(num_images, seed, shortcut, **options)
    truth_bytes = (json.dumps(truth, indent=1) + "\n").encode()
    if out.startswith("gs://"):
        from pneumonia import storage  # imports TensorFlow; only needed for buckets

        storage.write_bytes(truth_path(out), truth_bytes)
        storage.write_bytes(out, data)
        return out
    _write_local(truth_path(out), truth_bytes)
    _write_local(out, data)
    return out


def _write_local(out: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temp, 0o644)  # mkstemp makes 0600; the archive is a shared input
        os.replace(temp, out)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.data.demo", description=__doc__)
    parser.add_argument("--out", required=True, help="where to write the zip (local path or gs:// URL)")
    parser.add_argument("--num-images", type=int, default=300, help="images in the archive (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical zip (default 0)")
    parser.add_argument("--shortcut", metavar="CLASS", choices=sorted(CLASS_MIX),
                        help="plant a shortcut: CLASS looks like another class but for a marker")
    parser.add_argument("--marker", choices=MARKER_KINDS, default="square",
                        help="the planted marker: a bright square or burned-in letters (default square)")
    parser.add_argument("--marker-place", choices=MARKER_PLACES, default="upper",
                        help="a corner, an edge's middle, or upper: a random upper corner per film (default)")
    parser.add_argument("--label-noise", type=float, default=0.0, metavar="RATE",
                        help="file this share of each class's films under another class (default 0)")
    parser.add_argument("--hard-patients", type=float, default=HARD_PATIENT_FRACTION, metavar="FRACTION",
                        help=f"share of patients whose films are all fainter (default {HARD_PATIENT_FRACTION})")
    parser.add_argument("--aspect-only", action="store_true",
                        help="one pattern for all: the classes differ only in their films' aspect ratio")
    parser.add_argument("--real-sizes", action="store_true",
                        help="films 399-2,890 px wide as in the real archive (default: 150-300 px high)")
    args = parser.parse_args(argv)
    try:
        make_demo_archive(args.out, args.num_images, args.seed, args.shortcut, label_noise=args.label_noise,
                          hard_patient_fraction=args.hard_patients, marker=Marker(args.marker, args.marker_place),
                          aspect_only=args.aspect_only, real_sizes=args.real_sizes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    planted = f", shortcut planted in {args.shortcut}" if args.shortcut else ""
    noise = f", label noise {args.label_noise}" if args.label_noise else ""
    print(f"wrote {args.out} ({args.num_images} images, seed {args.seed}{planted}{noise}) and its truth "
          f"{truth_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
