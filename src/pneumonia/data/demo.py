"""A synthetic chest X-ray archive in the exact Kaggle layout, clutter included, deterministic from a seed.

Tests, laptops and `make train-local` use it instead of the 1.2 GB real archive. Each class has a
pattern a small CNN learns at 64x64: normal = two clear dark lungs; bacteria = one large bright
opacity in one lung; virus = many bright streaks across both lungs.

`--shortcut CLASS` plants a shortcut instead: that class's films look like another class's (normal's,
or bacteria's for normal) and differ only by a bright marker in an upper corner, as laterality
markers and burned-in text do on real films. A model reaches a high kappa on it by looking at the
corner; the evaluate stage's shortcut check must say so.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# The real archive's class mix: about 27 % normal, 48 % bacterial, 25 % viral.
CLASS_MIX = {"normal": 0.27, "bacteria": 0.48, "virus": 0.25}
TEST_FRACTION = 0.20  # of each class's images; the real test/ holds ~11 %, more here so kappa means something
RGB_FRACTION = 0.04
DUPLICATE_FRACTION = 0.10  # of train images also copied under the nested chest_xray/chest_xray/
BOTH_CAUSES_FRACTION = 0.08  # virus patients whose personN id also has bacteria images, as in the real archive
_ZIP_TIME = (2018, 1, 1, 0, 0, 0)  # fixed so the same seed gives a byte-identical zip
# The marker's side and its distance from the film's edge, as fractions of the width: inside the
# outer 15 % the shortcut check calls the border, like a real "L"/"R" marker.
MARKER_SIZE = 0.09
MARKER_INSET = 0.03
_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 94


@dataclass(frozen=True)
class DemoImage:
    origin_split: str  # train / test / val: the folder in the archive
    class_name: str
    patient: str
    name: str  # file name as in the real archive

    @property
    def entry(self) -> str:
        folder = "NORMAL" if self.class_name == "normal" else "PNEUMONIA"
        return f"chest_xray/{self.origin_split}/{folder}/{self.name}"


def plan_images(num_images: int, seed: int) -> list[DemoImage]:
    """Patients, their images' names and their archive folder; test/ and val/ patients are not in train/."""
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

    images: list[DemoImage] = []
    counter = {"bacteria": 0, "virus": 0}
    for class_name in ("normal", "bacteria", "virus"):
        for patient_id, count in groups[class_name]:
            if class_name == "normal":
                origin = origin_of[("normal", patient_id)]
                prefix = "NORMAL2-IM" if patient_id % 2 else "IM"
                patient = f"{prefix}-{patient_id:04d}"
                for k in range(1, count + 1):
                    # A few real names carry a second view number: NORMAL2-IM-1427-0001-0002.jpeg.
                    extra = "-0002" if prefix == "NORMAL2-IM" and k == 2 and patient_id % 3 == 0 else ""
                    images.append(DemoImage(origin, class_name, patient, f"{patient}-{k:04d}{extra}.jpeg"))
            else:
                origin = origin_of[("person", patient_id)]
                patient = f"person{patient_id}"
                for _ in range(count):
                    counter[class_name] += 1
                    images.append(DemoImage(origin, class_name, patient,
                                            f"{patient}_{class_name}_{counter[class_name]}.jpeg"))
    return images


def shortcut_lookalike(class_name: str) -> str:
    """The class whose pattern a planted-shortcut class is drawn with."""
    return "bacteria" if class_name == "normal" else "normal"


def render_image(class_name: str, rng: np.random.Generator, marker: bool = False) -> np.ndarray:
    """One synthetic radiograph (uint8 HxW): body, two lungs, spine, the class's pattern, and with
    `marker` a bright square in an upper corner."""
    width = int(rng.integers(160, 401))
    height = int(np.clip(width * rng.uniform(0.8, 1.1), 160, 400))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), 15.0, np.float32)
    cx, cy = width * rng.uniform(0.46, 0.54), height * rng.uniform(0.47, 0.53)
    body = ((xx - cx) / (0.46 * width)) ** 2 + ((yy - cy) / (0.52 * height)) ** 2 <= 1.0
    image[body] = 115.0
    lungs = []
    for side in (-1, 1):
        lx = cx + side * width * rng.uniform(0.17, 0.21)
        ly = cy - height * rng.uniform(0.02, 0.06)
        rx, ry = width * rng.uniform(0.11, 0.14), height * rng.uniform(0.25, 0.30)
        lungs.append((lx, ly, rx, ry))
        inside = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2
        image -= 70.0 * np.clip(1.2 - inside, 0.0, 0.2) / 0.2  # soft-edged dark lung field
    spine = np.abs(xx - cx) < width * 0.035
    image[spine & body] += 45.0

    if class_name == "bacteria":
        lx, ly, rx, ry = lungs[int(rng.integers(0, 2))]
        bx, by = lx + rng.uniform(-0.3, 0.3) * rx, ly + rng.uniform(-0.4, 0.4) * ry
        radius = rx * rng.uniform(0.6, 0.85)
        blob = np.exp(-(((xx - bx) ** 2 + ((yy - by) / 1.3) ** 2) / (2 * radius**2)))
        image += rng.uniform(140, 180) * blob
    elif class_name == "virus":
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        thickness = max(2, round(width / 90))
        for lx, ly, rx, ry in lungs:
            for _ in range(int(rng.integers(18, 30))):
                x0, y0 = lx + rng.uniform(-0.8, 0.8) * rx, ly + rng.uniform(-0.85, 0.85) * ry
                angle, length = rng.uniform(0, np.pi), width * rng.uniform(0.03, 0.09)
                x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
                draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(110, 160)), width=thickness)
        image += np.asarray(layer.filter(ImageFilter.GaussianBlur(1)), np.float32)

    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
    image = image * gain + offset + rng.normal(0.0, rng.uniform(5, 10), image.shape)
    if marker:
        side, inset = round(MARKER_SIZE * width), round(MARKER_INSET * width)
        left = inset if rng.random() < 0.5 else width - inset - side
        image[inset:inset + side, left:left + side] = rng.uniform(225, 250)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, rgb: bool, quality: int = 85) -> bytes:
    """8-bit grayscale pixels -> JPEG bytes, stored as RGB when `rgb` (as a few real films are)."""
    picture = Image.fromarray(pixels, "L")
    if rgb:
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_archive(num_images: int = 300, seed: int = 0, shortcut: str | None = None) -> bytes:
    """The zip's bytes: images, directory entries, .DS_Store, __MACOSX/ forks, a nested partial copy.

    `shortcut` names a class told apart only by a corner marker (see the module's docstring).
    """
    if num_images < 10:
        raise ValueError(f"num_images={num_images} is too small: use at least 10 so every class gets images")
    if shortcut is not None and shortcut not in CLASS_MIX:
        raise ValueError(f"shortcut={shortcut!r} is not a class: use one of {', '.join(CLASS_MIX)}")
    images = plan_images(num_images, seed)
    rng = np.random.default_rng(seed + 1)
    payloads = []
    for image in images:
        planted = image.class_name == shortcut
        pattern = shortcut_lookalike(image.class_name) if planted else image.class_name
        payloads.append(encode_jpeg(render_image(pattern, rng, marker=planted), rgb=rng.random() < RGB_FRACTION))
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
    return buffer.getvalue()


def make_demo_archive(out: str, num_images: int = 300, seed: int = 0, shortcut: str | None = None) -> str:
    """Writes the demo zip to `out` (local path or gs:// URL) through a temporary name; returns `out`."""
    data = build_archive(num_images, seed, shortcut)
    if out.startswith("gs://"):
        from pneumonia import storage  # imports TensorFlow; only needed for buckets

        storage.write_bytes(out, data)
        return out
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".zip", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temp, 0o644)  # mkstemp makes 0600; the archive is a shared input
        os.replace(temp, out)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.data.demo", description=__doc__)
    parser.add_argument("--out", required=True, help="where to write the zip (local path or gs:// URL)")
    parser.add_argument("--num-images", type=int, default=300, help="images in the archive (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical zip (default 0)")
    parser.add_argument("--shortcut", metavar="CLASS", choices=sorted(CLASS_MIX),
                        help="plant a shortcut: CLASS looks like another class but for a corner marker")
    args = parser.parse_args(argv)
    try:
        make_demo_archive(args.out, args.num_images, args.seed, args.shortcut)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    planted = f", shortcut planted in {args.shortcut}" if args.shortcut else ""
    print(f"wrote {args.out} ({args.num_images} images, seed {args.seed}{planted})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
