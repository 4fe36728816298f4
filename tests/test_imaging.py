"""Image ops, each checked eagerly and inside tf.data (the two differ in shape inference and RNG)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pneumonia.data import imaging


def in_tf_data(function, *args):  # noqa: ANN001, ANN201
    """Runs `function` on `args` inside a tf.data map (graph mode, unknown static shapes)."""
    dataset = tf.data.Dataset.from_tensors(tuple(args)).map(function)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset)))


def eager(function, *args):  # noqa: ANN001, ANN201
    return tf.nest.map_structure(lambda t: t.numpy(), function(*args))


def white(height: int, width: int, channels: int = 1) -> np.ndarray:
    return np.full((height, width, channels), 255, np.uint8)


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
        gray, height, width = run(lambda data: imaging.load_resized(data, 16, 16, 1), encoded)
        assert gray.shape == (16, 16, 1) and (height, width) == (20, 30)
        assert 100 < gray[8, 8, 0] < 140  # luma of pure green 200 is about 117
        colour = run(lambda data: imaging.decode(data, 3), encoded)
        assert colour.shape == (20, 30, 3)


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
