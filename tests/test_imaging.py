"""Image ops, each checked eagerly and inside tf.data (the two differ in shape inference and RNG)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pneumonia.data import demo, imaging


def in_tf_data(function, *args):  # noqa: ANN001, ANN201
    """Runs `function` on `args` inside a tf.data map (graph mode, unknown static shapes)."""
    dataset = tf.data.Dataset.from_tensors(tuple(args)).map(function)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset)))


def eager(function, *args):  # noqa: ANN001, ANN201
    return tf.nest.map_structure(lambda t: t.numpy(), function(*args))


def white(height: int, width: int, channels: int = 1) -> np.ndarray:
    return np.full((height, width, channels), 255, np.uint8)


def radiograph_jpeg(seed: int, scale: float = 4.0, rgb: bool = False, quality: int = 90) -> bytes:
    """A demo radiograph upscaled like the benchmark's sources (film grain added), as JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(demo.render_image("bacteria", rng), "L")
    big = np.asarray(small.resize((round(small.width * scale), round(small.height * scale)), Image.BILINEAR),
                     np.float32)
    pixels = np.clip(big + rng.normal(0.0, 2.0, big.shape), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels, "L")
    buffer = io.BytesIO()
    (picture.convert("RGB") if rgb else picture).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def full_decode_resized(data: bytes, height: int, width: int, channels: int = 1) -> np.ndarray:
    """The reference: the whole source decoded at full size (same IDCT), then the same area resize."""
    image = tf.io.decode_jpeg(data, channels=channels, dct_method=imaging.JPEG_DCT_METHOD)
    return imaging.resize_with_pad(image, height, width).numpy()


@pytest.mark.parametrize("size, fitted", [((600, 300), (64, 32)), ((300, 600), (32, 64)), ((64, 64), (64, 64)),
                                          ((20, 10), (64, 32)), ((1000, 3), (64, 1))])
def test_fitted_size_keeps_the_aspect_ratio(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    height, width = imaging.fitted_size(*size, 64, 64)
    assert (int(height), int(width)) == fitted


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_resize_with_pad_centres_the_image_on_black(run) -> None:  # noqa: ANN001
    out = run(lambda image: imaging.resize_with_pad(image, 64, 64), white(300, 600))
    assert out.shape == (64, 64, 1) and out.dtype == np.uint8
    rows = np.nonzero(out[:, :, 0].max(axis=1))[0]
    assert (rows.min(), rows.max()) == (16, 47)  # 32 rows of image, 16 of padding above and below
    assert out[16:48].min() == 255 and out[:16].max() == 0 and out[48:].max() == 0


def test_resize_is_deterministic_alias_free_and_the_same_eagerly_and_in_tf_data() -> None:
    stripes = np.zeros((512, 512, 1), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: aliasing would turn them into coarse bands
    first = eager(lambda image: imaging.resize_with_pad(image, 64, 64), stripes)
    again = eager(lambda image: imaging.resize_with_pad(image, 64, 64), stripes)
    graph = in_tf_data(lambda image: imaging.resize_with_pad(image, 64, 64), stripes)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, graph)
    assert abs(float(first.mean()) - 127.5) < 2 and first.std() < 2  # averaged to mid-grey


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_small_sources_are_enlarged_smoothly(run) -> None:  # noqa: ANN001
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))[..., None]  # 8 x 16, 16 grey levels
    out = run(lambda image: imaging.resize_with_pad(image, 64, 64), ramp)
    assert out.shape == (64, 64, 1)
    middle = out[32, :, 0]
    assert len(np.unique(middle)) > 40  # interpolated, not 16 repeated blocks
    assert np.all(np.diff(middle.astype(int)) >= 0)  # and still a ramp


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_decode_makes_the_requested_channels_from_jpeg_and_png(run) -> None:  # noqa: ANN001
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 1] = 200
    for encoded in (tf.io.encode_png(rgb), tf.io.encode_jpeg(rgb, quality=100)):
        gray, height, width = run(lambda data: imaging.load_resized(data, 16, 16, 1, fit="pad"), encoded)
        assert gray.shape == (16, 16, 1) and (height, width) == (20, 30)
        assert 100 < gray[8, 8, 0] < 140  # luma of pure green 200 is about 117
        colour = run(lambda data: imaging.decode(data, 3), encoded)
        assert colour.shape == (20, 30, 3)


# (source h, w, target h, w) -> ratio. libjpeg's 1/r decode is ceil(h / r) x ceil(w / r).
SCALE_CASES = [
    ((1600, 1200, 256, 256), 4),  # fits 256x192; 1/8 would be 200 rows < 256
    ((2900, 2400, 256, 256), 4),  # fits 256x212; 1/8 (363x300) would cover, but 1/8 is not used
    ((640, 640, 256, 256), 2),
    ((511, 511, 256, 256), 2),  # ceil(511 / 2) = 256 still covers
    ((510, 510, 256, 256), 1),  # 255 would need enlarging
    ((200, 100, 256, 256), 1),  # smaller than the target
    ((1000, 3, 64, 64), 4),  # fits 64x1
    ((3000, 3000, 224, 224), 4),
]


@pytest.mark.parametrize("case, ratio", SCALE_CASES)
@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_jpeg_scale_ratio_is_the_largest_that_still_covers_the_fit(run, case: tuple, ratio: int) -> None:  # noqa: ANN001
    source_height, source_width, target_height, target_width = case
    got = run(lambda h, w: imaging.jpeg_scale_ratio(h, w, target_height, target_width),
              tf.constant(source_height), tf.constant(source_width))
    assert int(got) == ratio
    fitted = [int(v) for v in imaging.fitted_size(source_height, source_width, target_height, target_width)]
    if ratio > 1:  # a scaled decode never has to be enlarged
        assert -(-source_height // ratio) >= fitted[0] and -(-source_width // ratio) >= fitted[1]
    if ratio < max(imaging.JPEG_SCALE_RATIOS):  # the next ratio up would have to enlarge
        assert -(-source_height // (2 * ratio)) < fitted[0] or -(-source_width // (2 * ratio)) < fitted[1]


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_large_jpeg_is_decoded_scaled_true_size_kept_and_close_to_a_full_decode(run) -> None:  # noqa: ANN001
    data = radiograph_jpeg(seed=1)  # 640-1600 px a side
    source_height, source_width = Image.open(io.BytesIO(data)).size[::-1]
    ratio = int(imaging.jpeg_scale_ratio(source_height, source_width, 128, 128))
    assert ratio >= 4
    out, height, width = run(lambda d: imaging.load_resized(d, 128, 128, 1, fit="pad"), data)
    assert out.shape == (128, 128, 1) and out.dtype == np.uint8
    assert (height, width) == (source_height, source_width)  # the source's size, not the scaled decode's
    # It really decoded at 1/ratio: exactly what an explicit scaled decode + the same resize gives ...
    scaled = tf.io.decode_jpeg(data, channels=1, ratio=ratio, dct_method=imaging.JPEG_DCT_METHOD)
    assert scaled.shape[:2] == (-(-source_height // ratio), -(-source_width // ratio))
    new_height, new_width = imaging.fitted_size(source_height, source_width, 128, 128)
    np.testing.assert_array_equal(out, imaging._resize_to_fit(scaled, new_height, new_width, 128, 128, "pad").numpy())
    # ... which is not the full decode's output, but very close to it (same geometry, same padding).
    reference = full_decode_resized(data, 128, 128)
    assert not np.array_equal(out, reference)
    assert imaging.psnr_db(reference, out) > 40.0
    np.testing.assert_array_equal(out == 0, reference == 0)  # padding in the same place


def test_scaled_decode_quality_on_benchmark_like_sources() -> None:
    """Several sources and shard sizes (ratios 1, 2, 4): PSNR against full decode + area resize."""
    checked = set()
    for seed, (size, scale) in enumerate([(256, 4.0), (224, 4.0), (256, 2.5), (128, 6.0), (512, 4.0), (512, 1.5)]):
        data = radiograph_jpeg(seed=seed + 10, scale=scale)
        source_height, source_width = Image.open(io.BytesIO(data)).size[::-1]
        checked.add(int(imaging.jpeg_scale_ratio(source_height, source_width, size, size)))
        out = imaging.load_resized(data, size, size, 1, fit="pad")[0].numpy()
        assert imaging.psnr_db(full_decode_resized(data, size, size), out) > 40.0, (seed, size, scale)
    assert checked == {1, 2, 4}


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_scaled_decode_converts_channels_like_a_full_decode(run) -> None:  # noqa: ANN001
    rgb = np.zeros((160, 240, 3), np.uint8)
    rgb[..., 1] = 200
    colour_jpeg = tf.io.encode_jpeg(rgb, quality=100).numpy()
    gray_jpeg = tf.io.encode_jpeg(np.full((160, 240, 1), 90, np.uint8), quality=100).numpy()
    assert int(imaging.jpeg_scale_ratio(160, 240, 16, 16)) == 4
    gray, height, width = run(lambda data: imaging.load_resized(data, 16, 16, 1, fit="pad"), colour_jpeg)
    assert gray.shape == (16, 16, 1) and (height, width) == (160, 240)
    assert 100 < gray[8, 8, 0] < 140  # luma of pure green 200 is about 117
    colour, _, _ = run(lambda data: imaging.load_resized(data, 16, 16, 3, fit="pad"), gray_jpeg)
    assert colour.shape == (16, 16, 3)
    assert np.all(np.abs(colour[8, 8].astype(int) - 90) <= 2)  # gray copied to R, G and B


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_png_sources_are_decoded_in_full(run) -> None:  # noqa: ANN001
    y, x = np.mgrid[0:300, 0:400]
    pixels = ((x + 3 * y) % 251).astype(np.uint8)[..., None]
    out, height, width = run(lambda data: imaging.load_resized(data, 32, 32, 1, fit="pad"), tf.io.encode_png(pixels))
    assert (height, width) == (300, 400)
    np.testing.assert_array_equal(out, imaging.resize_with_pad(pixels, 32, 32).numpy())


def test_load_resized_is_deterministic_eagerly_and_in_tf_data() -> None:
    data = radiograph_jpeg(seed=2, rgb=True)
    outputs = [eager(lambda d: imaging.load_resized(d, 96, 96, 1, fit="pad"), data) for _ in range(2)]
    outputs += [in_tf_data(lambda d: imaging.load_resized(d, 96, 96, 1, fit="pad"), data) for _ in range(2)]
    for out in outputs[1:]:
        for got, first in zip(out, outputs[0], strict=True):
            np.testing.assert_array_equal(got, first)
    for encoding in imaging.ENCODINGS:
        encoded = {imaging.encode(out[0], encoding).numpy() for out in outputs}
        assert len(encoded) == 1  # byte-identical shards from the same source


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_broken_jpeg_sources_raise_invalid_argument(run) -> None:  # noqa: ANN001
    data = radiograph_jpeg(seed=3)
    for broken in (b"\xff\xd8\xff" + b"\x00" * 64, data[: len(data) // 3]):
        with pytest.raises(tf.errors.InvalidArgumentError):
            run(lambda d: imaging.load_resized(d, 64, 64, 1, fit="pad"), broken)


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_png_is_lossless_and_jpeg_is_close(run) -> None:  # noqa: ANN001
    y, x = np.mgrid[0:64, 0:64]
    smooth = ((x * 2 + y) % 256).astype(np.uint8)[..., None]
    png = run(lambda image: imaging.decode_stored(imaging.encode(image, "png"), 64, 64, 1), smooth)
    np.testing.assert_array_equal(png, smooth)
    jpeg = run(lambda image: imaging.decode_stored(imaging.encode(image, "jpeg"), 64, 64, 1), smooth)
    assert 35.0 < imaging.psnr_db(smooth, jpeg) < float("inf")
    assert imaging.encode(smooth, "png").numpy() == imaging.encode(smooth, "png").numpy()
    with pytest.raises(ValueError, match="webp"):
        imaging.encode(smooth, "webp")


def test_to_float_scales_to_unit_range() -> None:
    out = imaging.to_float(tf.constant([0, 51, 255], tf.uint8))
    np.testing.assert_allclose(out.numpy(), [0.0, 0.2, 1.0])
    assert out.dtype == tf.float32


def test_augment_is_small_seeded_identical_in_tf_data_and_never_flips() -> None:
    image = np.zeros((64, 64, 1), np.float32)
    image[:, :24] = 0.8  # bright left third
    seed = tf.constant([3, 4], tf.int64)
    first = eager(imaging.augment, image, seed)
    graph = in_tf_data(imaging.augment, image, seed)
    np.testing.assert_allclose(first, graph, atol=1e-6)
    assert first.shape == (64, 64, 1) and first.min() >= 0.0 and first.max() <= 1.0
    assert not np.allclose(first, image)  # it does change the image
    outputs = [eager(imaging.augment, image, tf.constant([s, 0], tf.int64)) for s in range(20)]
    assert len({o.tobytes() for o in outputs}) == 20  # each seed its own jitter
    for out in outputs:
        assert out[:, :16].mean() > out[:, 48:].mean() + 0.4  # the bright side stays left: no flip
        assert np.abs(out.mean() - image.mean()) < 0.15  # small


def test_psnr() -> None:
    a = np.zeros((4, 4))
    assert imaging.psnr_db(a, a) == float("inf")
    assert imaging.psnr_db(a, a + 1) == pytest.approx(48.13, abs=0.01)


@pytest.mark.parametrize("size, covering", [((600, 300), (128, 64)), ((300, 600), (64, 128)), ((64, 64), (64, 64)),
                                            ((20, 10), (128, 64)), ((99, 100), (64, 65))])
def test_covering_size_keeps_the_aspect_ratio_and_covers_the_target(size, covering) -> None:  # noqa: ANN001
    height, width = imaging.covering_size(*size, 64, 64)
    assert (int(height), int(width)) == covering


@pytest.mark.parametrize("run", [eager, in_tf_data])
def test_crop_fills_the_target_with_the_film_s_centre_whatever_its_shape(run) -> None:  # noqa: ANN001
    # A wide film: black sides, a white centre square. Cropped to a square, it is all white (the
    # sides are cut); letterboxed, it shows bars above and below and the black sides.
    wide = np.zeros((100, 180, 1), np.uint8)
    wide[:, 40:140] = 255
    cropped = run(lambda image: imaging.resize_to_target(image, 32, 32, "crop"), wide)
    assert cropped.shape == (32, 32, 1) and cropped.min() >= 250
    padded = run(lambda image: imaging.resize_to_target(image, 32, 32, "pad"), wide)
    assert padded[:7].max() == 0 and padded[25:].max() == 0 and padded[16, 16, 0] == 255
    # Tall too: the crop keeps the middle rows.
    tall = np.zeros((180, 100, 1), np.uint8)
    tall[40:140] = 255
    assert run(lambda image: imaging.resize_to_target(image, 32, 32, "crop"), tall).min() >= 250
    # A film of films: every shape fills the target, so nothing outside the film can tell its shape.
    for height, width in ((140, 160), (140, 260), (300, 200), (20, 70)):
        film = np.full((height, width, 1), 200, np.uint8)
        assert run(lambda image: imaging.resize_to_target(image, 32, 32, "crop"), film).min() == 200


def test_crop_from_a_scaled_jpeg_decode_is_close_to_a_full_decode() -> None:
    data = radiograph_jpeg(seed=4, scale=6.0)
    out, height, width = imaging.load_resized(tf.constant(data), 64, 64, 1, fit="crop")
    assert imaging.jpeg_scale_ratio(height, width, 64, 64, "crop") >= 2  # really decoded smaller
    full = tf.io.decode_jpeg(data, channels=1, dct_method=imaging.JPEG_DCT_METHOD)
    reference = imaging.resize_to_target(full, 64, 64, "crop").numpy()
    assert imaging.psnr_db(reference, out.numpy()) > 40


def test_an_unknown_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fit 'stretch'"):
        imaging.load_resized(tf.constant(radiograph_jpeg(seed=1)), 32, 32, 1, fit="stretch")
