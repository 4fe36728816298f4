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


def decode(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
    """PNG/JPEG/BMP/GIF bytes -> uint8 [h, w, channels]; RGB sources become gray and gray ones RGB."""
    image = tf.io.decode_image(image_bytes, channels=channels, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def fitted_size(height: tf.Tensor, width: tf.Tensor, target_height: int, target_width: int) -> tuple:
    """The largest size with the source's aspect ratio that fits in the target (at least 1 px a side)."""
    height = tf.cast(height, tf.float64)
    width = tf.cast(width, tf.float64)
    scale = tf.minimum(target_height / height, target_width / width)
    new_height = tf.clip_by_value(tf.cast(tf.round(height * scale), tf.int32), 1, target_height)
    new_width = tf.clip_by_value(tf.cast(tf.round(width * scale), tf.int32), 1, target_width)
    return new_height, new_width


def resize_with_pad(image: tf.Tensor, target_height: int, target_width: int) -> tf.Tensor:
    """uint8 [h, w, C] -> uint8 [target_height, target_width, C], aspect ratio kept, centred on black.

    Padding rather than cropping: the lung fields reach the image edges (costophrenic angles,
    apices) and a crop could cut away the opacity that makes the label. The padding is black,
    like the collimated border most radiographs already have. Shrinking uses area averaging (each
    output pixel is the mean of the source pixels it covers), which cannot alias rib edges and
    measured 2-4x faster than tf.image.resize's antialiased bilinear; enlarging (sources smaller
    than the target) uses bilinear, where area would give blocks.
    """
    shape = tf.shape(image)
    new_height, new_width = fitted_size(shape[0], shape[1], target_height, target_width)
    new_size = tf.stack([new_height, new_width])
    shrinking = tf.logical_and(new_height <= shape[0], new_width <= shape[1])
    resized = tf.cond(shrinking, lambda: tf.image.resize(image, new_size, method="area"),
                      lambda: tf.image.resize(image, new_size, method="bilinear"))
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    padded = tf.image.pad_to_bounding_box(
        resized, (target_height - new_height) // 2, (target_width - new_width) // 2, target_height, target_width)
    padded.set_shape([target_height, target_width, image.shape[-1]])
    return padded


def load_resized(image_bytes: tf.Tensor, height: int, width: int, channels: int) -> tuple:
    """Source file bytes -> (uint8 [height, width, channels], original height, original width)."""
    image = decode(image_bytes, channels)
    shape = tf.shape(image)
    return resize_with_pad(image, height, width), shape[0], shape[1]


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
