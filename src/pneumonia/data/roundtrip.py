"""The round-trip check: shards read back through the input pipeline must match the manifest and sources.

Every record's label, class and path are checked against the split manifest (the same set comes
back, nothing lost or doubled); sampled images are decoded by the pipeline and compared with the
source after the same resize: equal pixels for PNG, PSNR above a floor for JPEG. The pairs are
drawn to roundtrip.png for people, each beside its whole film with the part the resize keeps boxed
(shard.fit: crop cuts a film's sides or ends, pad keeps all of it and adds bars). The shard stage
runs it before writing its marker.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from pneumonia import storage
from pneumonia.config import CLASS_NAMES, PipelineConfig
from pneumonia.data import imaging, pipeline, tfrecords
from pneumonia.errors import BadInputError, StorageError
from pneumonia.logs import get_logger

log = get_logger(__name__)

PLOT_NAME = "roundtrip.png"
_MAX_PROBLEMS_SHOWN = 5
_MAX_PAIRS_DRAWN = 36
_CELL_PX = 256  # the longer side of each drawn image, whatever the shard size
_FONT_PX = 12
_GAP_PX = 4
_MARGIN_PX = 16


@dataclass
class Pair:
    split: str
    class_name: str
    source_path: str
    shard: str
    source: np.ndarray  # float [H, W, C] in [0, 1], the source after the writer's resize
    stored: np.ndarray  # float [H, W, C] in [0, 1], as the input pipeline yields it
    stored_class_name: str
    psnr_db: float
    film: np.ndarray | None = None  # float [H, W, C]: the whole film letterboxed into the shard size
    kept: tuple[float, float, float, float] | None = None  # (top, left, height, width) in `film`: what the fit keeps
    kept_caption: str = "film"


def sample_rows(rows: list[dict[str, Any]], per_class: int, seed: int) -> list[dict[str, Any]]:
    """`per_class` rows of every (split, class), picked by a seeded hash so reruns pick the same ones."""
    def key(row: dict[str, Any]) -> str:
        return hashlib.sha256(f"roundtrip/{seed}/{row['path']}".encode()).hexdigest()

    picked = []
    for split in pipeline.SPLITS:
        for class_name in CLASS_NAMES:
            group = sorted((r for r in rows if r["split"] == split and r["class"] == class_name), key=key)
            picked.extend(group[:per_class])
    return picked


def check(processed_dir: str, shards: list[dict[str, Any]], rows: list[dict[str, Any]], config: PipelineConfig,
          data_root: str) -> dict[str, Any]:
    """Checks `shards` ([{name, split}]) against the manifest `rows` to shard; returns a summary.

    Raises BadInputError naming the shard file and source path of the first mismatches; the plot
    is written either way, since it is most useful when the check fails.
    """
    shard_config = config.shard
    height, width, channels = shard_config.image_height, shard_config.image_width, shard_config.channels
    expected = {row["path"]: row for row in rows}
    wanted = {row["path"] for row in sample_rows(rows, shard_config.roundtrip_samples_per_class, config.split.seed)}
    problems: list[str] = []
    seen: dict[str, str] = {}
    samples: dict[str, tuple[str, bytes, tfrecords.Record]] = {}  # source path -> (shard, record bytes, metadata)

    for shard in shards:
        path = storage.join(processed_dir, shard["name"])
        try:
            for index, (serialized, record) in enumerate(tfrecords.read_metadata(path)):
                where = f"record {index} of shard {path} (source {record.source_path})"
                row = expected.get(record.source_path)
                if row is None or row["split"] != shard["split"]:
                    problems.append(f"{where}: not a {shard['split']} row of the split manifest")
                    continue
                if record.source_path in seen:
                    problems.append(f"{where}: also in shard {seen[record.source_path]} (duplicate)")
                seen[record.source_path] = path
                if (record.label != row["label"] or record.class_name != row["class"]
                        or CLASS_NAMES[record.label] != record.class_name):
                    problems.append(f"{where}: label {record.label} ({record.class_name}) but the manifest says "
                                    f"{row['label']} ({row['class']})")
                if record.patient != row["patient"]:
                    problems.append(f"{where}: patient {record.patient!r}, manifest {row['patient']!r}")
                if (record.height, record.width, record.channels) != (height, width, channels) \
                        or record.image_format != shard_config.encoding:
                    problems.append(f"{where}: stored as {record.height}x{record.width}x{record.channels} "
                                    f"{record.image_format}, config says {shard_config.size_dir} {shard_config.encoding}")
                if record.source_path in wanted:
                    samples[record.source_path] = (path, serialized, record)
        except (tf.errors.DataLossError, tf.errors.NotFoundError) as error:
            # Shards this stage wrote and checksummed moments ago: unreadable now is storage, not input.
            raise StorageError(f"shard {path} cannot be read back ({error.message.splitlines()[0]}); the storage "
                               "is failing: the stage is retried") from None
        except tf.errors.InvalidArgumentError as error:  # records that are not ours: a file put there by hand
            raise BadInputError(f"shard {path} cannot be read ({error.message.splitlines()[0]}); delete it and "
                                "rerun the shard stage") from None
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"{len(missing)} manifest rows are in no shard, e.g. {', '.join(missing[:3])}")

    pairs = []
    order = {(split, name): i for i, (split, name) in enumerate(
        (split, name) for split in pipeline.SPLITS for name in CLASS_NAMES)}
    for source_path in sorted(samples, key=lambda p: (order[(expected[p]["split"], expected[p]["class"])], p)):
        shard_path, serialized, record = samples[source_path]
        row = expected[source_path]
        decoded = pipeline.decode_record(tf.constant(serialized), height, width, channels)
        source_bytes = storage.read_bytes(storage.join(data_root, source_path))
        resized, original_height, original_width = imaging.load_resized(source_bytes, height, width, channels,
                                                                                fit=shard_config.fit)
        source = imaging.to_float(resized).numpy()
        stored = decoded["image"].numpy()
        psnr = imaging.psnr_db(source * 255.0, stored * 255.0)
        stored_label = int(np.argmax(decoded["label"].numpy()))
        film = imaging.load_resized(source_bytes, height, width, channels, fit="pad")[0]
        pairs.append(Pair(row["split"], row["class"], source_path, shard_path, source, stored,
                          CLASS_NAMES[stored_label], psnr, imaging.to_float(film).numpy(),
                          kept_box(int(original_height), int(original_width), height, width, shard_config.fit),
                          kept_caption(int(original_height), int(original_width), height, width, shard_config.fit)))
        where = f"shard {shard_path}, source {source_path}"
        if (record.original_height, record.original_width) != (int(original_height), int(original_width)):
            problems.append(f"{where}: original size {record.original_height}x{record.original_width} recorded, "
                            f"source is {int(original_height)}x{int(original_width)}")
        if shard_config.encoding == "png":
            if not np.array_equal(source, stored):
                problems.append(f"{where}: pixels differ from the resized source (PSNR {psnr:.1f} dB; PNG is "
                                "lossless, so the shard or the source changed)")
        elif psnr < shard_config.roundtrip_min_psnr_db:
            problems.append(f"{where}: PSNR {psnr:.1f} dB below shard.roundtrip_min_psnr_db "
                            f"{shard_config.roundtrip_min_psnr_db}")

    write_plot(storage.join(processed_dir, PLOT_NAME), pairs)
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - _MAX_PROBLEMS_SHOWN} more)" if len(problems) > _MAX_PROBLEMS_SHOWN else ""
        raise BadInputError(f"round-trip check failed: {shown}{more}; see {storage.join(processed_dir, PLOT_NAME)}. "
                            "Rerun the shard stage; if it fails again, check the split manifest and interim/")
    finite = [pair.psnr_db for pair in pairs if math.isfinite(pair.psnr_db)]
    summary = {"num_records_checked": len(seen), "num_images_compared": len(pairs),
               "min_psnr_db": round(min(finite), 2) if finite else None, "plot": PLOT_NAME}
    log.info("round-trip check passed", **summary)
    return summary


def kept_box(original_height: int, original_width: int, height: int, width: int,
             fit: str) -> tuple[float, float, float, float]:
    """(top, left, height, width) of the part of a film that `fit` keeps, in the film letterboxed into
    height x width (imaging.fitted_size): the centred target-shaped part for crop, all of it for pad."""
    fitted_height, fitted_width = (int(v) for v in imaging.fitted_size(original_height, original_width, height, width))
    top, left = (height - fitted_height) // 2, (width - fitted_width) // 2
    if fit == "pad":
        return float(top), float(left), float(fitted_height), float(fitted_width)
    cover = max(height / original_height, width / original_width)  # the crop's scale (imaging.covering_size)
    kept_height = height / cover * fitted_height / original_height
    kept_width = width / cover * fitted_width / original_width
    return (top + (fitted_height - kept_height) / 2, left + (fitted_width - kept_width) / 2, kept_height, kept_width)


def write_plot(path: str, pairs: list[Pair]) -> None:
    """Each film whole with the part the resize keeps boxed, then its source / shard pair, captioned
    with their class names, three per row.

    Drawn with Pillow rather than matplotlib: a grid of images with captions needs no axes, and
    matplotlib's figure took ~1 s per shard run (a quarter of the stage on 2,000 images).
    A pair whose stored label differs from the manifest's is captioned in red; the kept part's box
    is drawn in orange, so what lies outside it is what the shards lose.
    """
    pairs = pairs[:_MAX_PAIRS_DRAWN]
    font = ImageFont.load_default(size=_FONT_PX)
    line = _FONT_PX + 3
    cell_height, cell_width = pairs[0].source.shape[:2] if pairs else (_CELL_PX, _CELL_PX)
    scale = _CELL_PX / max(cell_height, cell_width)  # every shard size is drawn at one readable size
    cell_height, cell_width = max(1, round(cell_height * scale)), max(1, round(cell_width * scale))
    per_row = 3
    pair_width = 3 * cell_width + 2 * _GAP_PX
    block_height = 2 * line + cell_height
    num_rows = max(1, math.ceil(len(pairs) / per_row))
    top = 2 * line
    canvas = Image.new("RGB", (_MARGIN_PX + per_row * (pair_width + _MARGIN_PX),
                               top + num_rows * (block_height + _MARGIN_PX)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN_PX, _GAP_PX), "round trip: the whole film, what the resize keeps boxed (left); source after "
              "resize (middle) vs shard read by the input pipeline (right)", fill="black", font=font)
    if not pairs:
        draw.text((_MARGIN_PX, top), "no images to compare", fill="black", font=font)
    for index, pair in enumerate(pairs):
        row, column = divmod(index, per_row)
        x = _MARGIN_PX + column * (pair_width + _MARGIN_PX)
        y = top + row * (block_height + _MARGIN_PX)
        colour = "black" if pair.class_name == pair.stored_class_name else "red"
        film = pair.film if pair.film is not None else pair.source
        for offset, (image, caption) in enumerate((
                (film, (f"{pair.split}: {pair.class_name}", pair.kept_caption)),
                (pair.source, ("", "source")),
                (pair.stored, (pair.stored_class_name, f"shard ({_psnr_text(pair.psnr_db)})")))):
            left = x + offset * (cell_width + _GAP_PX)
            for number, text in enumerate(caption):
                draw.text((left, y + number * line), text, fill=colour, font=font)
            canvas.paste(_to_picture(image, cell_width, cell_height), (left, y + 2 * line))
        if pair.kept is not None:
            box_top, box_left, box_height, box_width = (value * scale for value in pair.kept)
            draw.rectangle((x + box_left, y + 2 * line + box_top, x + box_left + box_width - 1,
                            y + 2 * line + box_top + box_height - 1), outline="orange", width=2)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=1)  # written once, looked at once: speed over size
    storage.write_bytes(path, buffer.getvalue())


def kept_caption(original_height: int, original_width: int, height: int, width: int, fit: str) -> str:
    """What `fit` keeps of a film, in words: "keeps 67 % of its width", "all kept, bars added"."""
    source_aspect, target_aspect = original_width / original_height, width / height
    if fit == "pad" or math.isclose(source_aspect, target_aspect, rel_tol=0.01):
        return "film: all kept" + (", bars added" if fit == "pad" and source_aspect != target_aspect else "")
    if source_aspect > target_aspect:
        return f"film: keeps {target_aspect / source_aspect * 100:.0f} % of its width"
    return f"film: keeps {source_aspect / target_aspect * 100:.0f} % of its height"


def _to_picture(image: np.ndarray, width: int, height: int) -> Image.Image:
    """float [H, W, C] in [0, 1] -> an RGB picture of the given size."""
    pixels = np.clip(np.round(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
    if picture.size == (width, height):
        return picture
    # Enlarged shards keep their pixels visible as blocks (that is what is being checked); shrunk ones are averaged.
    shrinking = picture.width > width
    return picture.resize((width, height), Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST)


def _psnr_text(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f} dB"
