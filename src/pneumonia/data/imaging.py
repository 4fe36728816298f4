"""Image ops shared by the shard writer, the round-trip check and the input pipeline.

Every op is a TensorFlow op, so the writer, the check and tf.data run exactly the same code.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

ENCODINGS = ("png", "jpeg")
# 95 keeps grayscale X-rays well above the round-trip PSNR floor (35 dB) while still being small.
JPEG_QUALITY = 95
# zlib level 1: measured ~3x faster to write than the default (6) for ~15 % more bytes; shards stay a
# fraction of the source JPEGs and decode as fast, and the shard stage spends most time encoding.
PNG_COMPRESSION = 1
# libjpeg's DCT-domain scale denominators (decode at 1/r), smallest first. 1/8 is left out: it keeps
# only each block's DC term (an 8x8 box average on the block grid, whose partial last block shifts
# sharp edges), and measured 32.6 dB min / 38.6 dB median PSNR against full decode + area resize at
# 128 px, where 1/2 and 1/4 stay above 43 dB; it decodes no faster than 1/4 (Huffman decoding,
# which no ratio skips, is most of the cost).
JPEG_SCALE_RATIOS = (1, 2, 4)
# Source JPEGs: the accurate integer IDCT at every ratio (the default is the fast, less exact one;
# at ratio > 1 libjpeg uses its reduced-size IDCTs either way). Same time on the sources measured.
JPEG_DCT_METHOD = "INTEGER_ACCURATE"
# Names how source pixels become shard pixels; part of the shard stage's fingerprint, so shards
# written by an older resize are redone rather than mixed with new ones (and fail the PNG check).
# How a film of another shape fits the target is the shard setting `fit` (FITS), fingerprinted too.
RESIZE_METHOD = "jpeg-dct-scaled/area-shrink/bilinear-enlarge/v3"
# crop: scale the film to cover the target, then cut the centre to the target's aspect ratio (as
# torchxrayvision does): every film fills the target, so its shape tells nothing. pad: scale it to
# fit inside and centre it on black (letterboxing): the bars' shape is the film's shape, which in
# the real archive tells the class (docs/shortcuts.md).
FITS = ("crop", "pad")


def decode(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
    """PNG/JPEG/BMP/GIF bytes -> uint8 [h, w, channels]; RGB sources become gray and gray ones RGB."""
    image = tf.io.decode_image(image_bytes, channels=channels, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def jpeg_scale_ratio(source_height: tf.Tensor, source_width: tf.Tensor, target_height: int,
                     target_width: int, fit: str = "pad") -> tf.Tensor:
    """The largest libjpeg scale denominator r in JPEG_SCALE_RATIOS whose decode still covers the fit.

    libjpeg decodes at 1/r in the DCT domain to ceil(h / r) x ceil(w / r); r is the largest whose
    size stays >= scaled_size(h, w, target, fit) on both sides, so the resize after it only ever
    shrinks (area averaging) and never enlarges. A source already smaller than the target gets 1.
    Returns an int32 scalar tensor; works eagerly and in graphs.
    """
    source_height = tf.cast(source_height, tf.int32)
    source_width = tf.cast(source_width, tf.int32)
    new_height, new_width = scaled_size(source_height, source_width, target_height, target_width, fit)
    ratio = tf.constant(1, tf.int32)
    for candidate in JPEG_SCALE_RATIOS[1:]:  # increasing; coverage only shrinks as r grows
        covers = tf.logical_and(-(-source_height // candidate) >= new_height,
                                -(-source_width // candidate) >= new_width)
        ratio = tf.where(covers, tf.constant(candidate, tf.int32), ratio)
    return ratio


def decode_jpeg_scaled(image_bytes: tf.Tensor, channels: int, ratio: tf.Tensor) -> tf.Tensor:
    """JPEG bytes -> uint8 [ceil(h / ratio), ceil(w / ratio), channels], scaled in the DCT domain.

    `ratio` (one of JPEG_SCALE_RATIOS) may be a tensor: decode_jpeg takes it as a static attribute,
    so each value is its own branch. One DCT method at every ratio (JPEG_DCT_METHOD).
    """
    index = tf.reduce_sum(tf.cast(tf.cast(ratio, tf.int32) >= tf.constant(JPEG_SCALE_RATIOS[1:]), tf.int32))
    index = tf.minimum(index, len(JPEG_SCALE_RATIOS) - 1)
    branches = [lambda r=r: tf.io.decode_jpeg(image_bytes, channels=channels, ratio=r, dct_method=JPEG_DCT_METHOD)
                for r in JPEG_SCALE_RATIOS]
    image = tf.switch_case(index, branches)
    image.set_shape([None, None, channels])
    return image


def decode_source(image_bytes: tf.Tensor, target_height: int, target_width: int,
                  channels: int, fit: str = "pad") -> tuple:
    """Source file bytes -> (uint8 [h', w', channels], true height, true width), decoded only as large as needed.

    JPEGs (by their magic bytes) are decoded at the reduced scale of jpeg_scale_ratio, their true
    size read from the header; everything else (PNG, BMP, GIF) is decoded in full.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

    def from_jpeg() -> tuple:
        shape = tf.image.extract_jpeg_shape(image_bytes)
        ratio = jpeg_scale_ratio(shape[0], shape[1], target_height, target_width, fit)
        return decode_jpeg_scaled(image_bytes, channels, ratio), shape[0], shape[1]

    def in_full() -> tuple:
        image = decode(image_bytes, channels)
        shape = tf.shape(image)
        return image, shape[0], shape[1]

    return tf.cond(tf.io.is_jpeg(image_bytes), from_jpeg, in_full)


def fitted_size(height: tf.Tensor, width: tf.Tensor, target_height: int, target_width: int) -> tuple:
    """The largest size with the source's aspect ratio that fits in the target (at least 1 px a side)."""
    height = tf.cast(height, tf.float64)
    width = tf.cast(width, tf.float64)
    scale = tf.minimum(target_height / height, target_width / width)
    new_height = tf.clip_by_value(tf.cast(tf.round(height * scale), tf.int32), 1, target_height)
    new_width = tf.clip_by_value(tf.cast(tf.round(width * scale), tf.int32), 1, target_width)
    return new_height, new_width


def covering_size(height: tf.Tensor, width: tf.Tensor, target_height: int, target_width: int) -> tuple:
    """The smallest size with the source's aspect ratio that covers the target (at least the target a side)."""
    height = tf.cast(height, tf.float64)
    width = tf.cast(width, tf.float64)
    scale = tf.maximum(target_height / height, target_width / width)
    new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), target_height)
    new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), target_width)
    return new_height, new_width


def scaled_size(height: tf.Tensor, width: tf.Tensor, target_height: int, target_width: int, fit: str) -> tuple:
    """The size a source is resized to before `fit` crops (covering_size) or pads (fitted_size) it."""
    check_fit(fit)
    return (covering_size if fit == "crop" else fitted_size)(height, width, target_height, target_width)


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; expected one of {FITS}")


def resize_to_target(image: tf.Tensor, target_height: int, target_width: int, fit: str) -> tf.Tensor:
    """uint8 [h, w, C] -> uint8 [target_height, target_width, C], aspect ratio kept: centre-cropped
    (`fit="crop"`) or centred on black (`fit="pad"`). See FITS and resize_with_pad."""
    shape = tf.shape(image)
    new_height, new_width = scaled_size(shape[0], shape[1], target_height, target_width, fit)
    return _resize_to_fit(image, new_height, new_width, target_height, target_width, fit)


def resize_with_pad(image: tf.Tensor, target_height: int, target_width: int) -> tf.Tensor:
    """uint8 [h, w, C] -> uint8 [target_height, target_width, C], aspect ratio kept, centred on black.

    Padding keeps the whole film (a crop cuts the sides of a wide one), but the bars' shape is the
    film's shape, and in the real archive that tells the class: the shard stage crops by default
    (shard.fit, docs/shortcuts.md). Shrinking uses area averaging (each output pixel is the mean of
    the source pixels it covers), which cannot alias rib edges and measured 2-4x faster than
    tf.image.resize's antialiased bilinear; enlarging (sources smaller than the target) uses
    bilinear, where area would give blocks.
    """
    return resize_to_target(image, target_height, target_width, "pad")


def _resize_to_fit(image: tf.Tensor, new_height: tf.Tensor, new_width: tf.Tensor, target_height: int,
                   target_width: int, fit: str) -> tf.Tensor:
    """resize_to_target's body, with the scaled size given (from the source's true size)."""
    shape = tf.shape(image)
    new_size = tf.stack([new_height, new_width])
    shrinking = tf.logical_and(new_height <= shape[0], new_width <= shape[1])
    resized = tf.cond(shrinking, lambda: tf.image.resize(image, new_size, method="area"),
                      lambda: tf.image.resize(image, new_size, method="bilinear"))
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    if fit == "crop":
        placed = tf.image.crop_to_bounding_box(
            resized, (new_height - target_height) // 2, (new_width - target_width) // 2, target_height, target_width)
    else:
        placed = tf.image.pad_to_bounding_box(
            resized, (target_height - new_height) // 2, (target_width - new_width) // 2, target_height, target_width)
    placed.set_shape([target_height, target_width, image.shape[-1]])
    return placed


def load_resized(image_bytes: tf.Tensor, height: int, width: int, channels: int, *, fit: str) -> tuple:
    """Source file bytes -> (uint8 [height, width, channels], original height, original width).

    The one function behind the shard writer, the round-trip check and predict, so all three give
    the same pixels; `fit` is the shard setting (FITS). JPEG sources are decoded at a reduced scale
    (decode_source); the scaled size comes from the source's true size, so the output geometry is
    the same as a full decode's.
    """
    check_fit(fit)
    image, original_height, original_width = decode_source(image_bytes, height, width, channels, fit)
    new_height, new_width = scaled_size(original_height, original_width, height, width, fit)
    return _resize_to_fit(image, new_height, new_width, height, width, fit), original_height, original_width


def model_input(image_bytes: tf.Tensor, height: int, width: int, channels: int, encoding: str = "png", *,
                fit: str) -> tf.Tensor:
    """Source file bytes -> float32 [height, width, channels] in [0, 1]: what the model sees for a file.

    The shard writer's pixels as the input pipeline reads them back from a shard stored with
    `encoding`: for JPEG shards the resized image goes through the same JPEG encode and decode, so
    a served file gets the very pixels (artifacts included) the model trained on and evaluate
    scored; PNG is lossless and needs no round trip. The exported model's serving signature (and
    so pneumonia.predict) runs exactly this in its graph.
    """
    resized = load_resized(image_bytes, height, width, channels, fit=fit)[0]
    if encoding != "png":
        resized = decode_stored(encode(resized, encoding), height, width, channels)
    return to_float(resized)


def encode(image: tf.Tensor, encoding: str) -> tf.Tensor:
    """uint8 [H, W, C] -> PNG (lossless) or JPEG bytes; deterministic for the same pixels."""
    if encoding == "png":
        return tf.io.encode_png(image, compression=PNG_COMPRESSION)
    if encoding == "jpeg":
        return tf.io.encode_jpeg(image, quality=JPEG_QUALITY)
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_stored(image_bytes: tf.Tensor, height: int, width: int, channels: int) -> tf.Tensor:
    """A shard's encoded image -> uint8 [height, width, channels] with a static shape."""
    image = tf.io.decode_image(image_bytes, channels=channels, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [height, width, channels])


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 in [0, 1] (the contract's model input)."""
    return tf.cast(image, tf.float32) / 255.0


def augment(image: tf.Tensor, seed: tf.Tensor, max_delta: float = 0.08, max_shift: float = 0.05,
            max_zoom: float = 0.08) -> tf.Tensor:
    """Small brightness/contrast jitter, translation and zoom of a float [H, W, C] image in [0, 1].

    Stateless (seeded per element), so a given seed gives the same result eagerly and in tf.data.
    No flips or large rotations: a mirrored chest puts the heart on the right (dextrocardia, not
    in this data) and mirrors the L/R markers, so it would teach the model anatomy that does
    not occur rather than robustness to what does (patient position, exposure).
    """
    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    image = tf.image.stateless_random_brightness(image, max_delta, seeds[0])
    image = tf.image.stateless_random_contrast(image, 1.0 - max_delta, 1.0 + max_delta, seeds[1])
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    shift = tf.random.stateless_uniform([2], seeds[2], -max_shift, max_shift)
    zoom = tf.random.stateless_uniform([], seeds[3], 1.0 - max_zoom, 1.0 + max_zoom)
    # The projective transform maps output (x, y) to input (x', y') = (x - cx) / zoom + cx - dx.
    center_x, center_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    inverse = 1.0 / zoom
    offset_x = center_x - inverse * center_x - shift[0] * width
    offset_y = center_y - inverse * center_y - shift[1] * height
    transform = tf.stack([inverse, 0.0, offset_x, 0.0, inverse, offset_y, 0.0, 0.0])[tf.newaxis]
    image = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return tf.clip_by_value(image, 0.0, 1.0)


def psnr_db(reference: np.ndarray, candidate: np.ndarray, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; infinity for identical images."""
    error = np.mean((np.asarray(reference, np.float64) - np.asarray(candidate, np.float64)) ** 2)
    return math.inf if error == 0 else 10.0 * math.log10(max_value**2 / error)
