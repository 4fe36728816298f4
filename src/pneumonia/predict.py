"""Class probabilities for images with a trained run, one JSON line per image on stdout.

    python -m pneumonia.predict RUN_DIR IMAGE_OR_FOLDER [--batch-size N] [--gradcam OUT_DIR]

RUN_DIR is `runs/<run_id>` (local or gs://). The images go, as encoded files, through the run's
export (`model/1/`, its `serving_default` signature) exactly as a model server would send them: the
export decodes and resizes in its graph with the shard stage's own function (the run's `shard.fit`:
centre crop by default, or padding), holds the best weights evaluate scored, and applies the calibration fitted on val
(docs/report-statistics.md), so these are the probabilities a served model returns. A folder is searched recursively for
.jpeg/.jpg/.png/.bmp/.gif files (hidden files such as macOS `._*` forks skipped), in sorted order.
Output lines:

    {"path": "...", "probabilities": {"normal": 0.1, "bacteria": 0.8, "virus": 0.1}, "class": "bacteria"}

`--gradcam OUT_DIR` also writes, per image, the image beside its Grad-CAM heatmap for the predicted
class (`pneumonia.evaluation.saliency`) to OUT_DIR/<path under IMAGE_OR_FOLDER, '/' as '__'>.gradcam.png.

Logs go to stderr. Exit 2 for a missing run or export, image or folder, or an image that cannot be decoded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from pneumonia import storage
from pneumonia.config import CLASS_NAMES, ShardConfig
from pneumonia.data import imaging
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadInputError
from pneumonia.layout import Layout
from pneumonia.logs import configure_logging, get_logger
from pneumonia.training import export

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif")


def find_images(path: str) -> list[str]:
    """`path` itself if it is a file, else every image file under the folder, sorted."""
    if not storage.exists(path):
        raise BadInputError(f"{path} does not exist; pass an image file or a folder of images")
    if not tf.io.gfile.isdir(path):
        return [path]
    found = []
    for folder, _, names in tf.io.gfile.walk(path):
        found += [storage.join(folder, name) for name in names
                  if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")]
    if not found:
        raise BadInputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return sorted(found)


def load_export(run_dir: str) -> export.ServedModel:
    """The run's exported model, loaded as a server loads it; BadInputError when the run has none."""
    layout, run_id = Layout.of_run_dir(run_dir)
    model_dir = layout.saved_model(run_id)
    if not storage.exists(storage.join(model_dir, "saved_model.pb")):
        raise BadInputError(f"{model_dir}/saved_model.pb is missing: {run_dir} has no exported model "
                            "(did training finish? runs trained before the export existed need retraining)")
    return export.ServedModel(model_dir)


def predict(run_dir: str, paths: Sequence[str], batch_size: int = 32) -> Iterator[dict]:
    """Yields {"path", "probabilities", "class"} per image, in the order of `paths`."""
    served = load_export(run_dir)
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        files = [storage.read_bytes(path) for path in chunk]
        try:
            rows, classes = served(files)
        except tf.errors.InvalidArgumentError:
            _raise_for_undecodable(served, chunk, files)
            raise
        for path, row, name in zip(chunk, rows, classes, strict=True):
            probabilities = {class_name: float(value) for class_name, value in zip(CLASS_NAMES, row, strict=True)}
            yield {"path": path, "probabilities": probabilities, "class": name}


def _raise_for_undecodable(served: export.ServedModel, paths: list[str], files: list[bytes]) -> None:
    """A batch failed to decode: name the first file that fails alone (BadInputError)."""
    for path, data in zip(paths, files, strict=True):
        try:
            served([data])
        except tf.errors.InvalidArgumentError as error:
            raise BadInputError(f"{path} is not a decodable image: {error.message.splitlines()[0]}") from None


def gradcam_name(path: str, images_arg: str) -> str:
    """The heatmap's file name: the image's path under the folder given (its name for a file), flattened."""
    base = images_arg.rstrip("/")
    relative = path[len(base) + 1:] if path.startswith(base + "/") else path.rpartition("/")[2]
    return relative.replace("/", "__") + ".gradcam.png"


def write_gradcams(run_dir: str, paths: Sequence[str], out_dir: str, images_arg: str,
                   batch_size: int = 32) -> list[str]:
    """Writes each image's Grad-CAM (predicted class) beside the image to `out_dir`; returns the files.

    Grad-CAM needs the Keras model's layers, not a serving signature: the model is rebuilt from the
    run's config and best weights, as the evaluate stage does.
    """
    from pneumonia.evaluation import saliency  # pulls in tf_keras and matplotlib; only when asked
    from pneumonia.trained import load_trained_model

    model, run_config = load_trained_model(run_dir)
    shard = run_config.shard
    gradcam = saliency.build_gradcam(model)
    infer = tf.function(lambda images: model(images, training=False))
    written = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        images = tf.constant(np.stack([_model_input(path, shard) for path in chunk]))
        predicted = np.argmax(infer(images).numpy(), axis=1)
        heatmaps = gradcam(images, tf.constant(predicted)).numpy()
        for path, image, heatmap, index in zip(chunk, images.numpy(), heatmaps, predicted, strict=True):
            destination = storage.join(out_dir, gradcam_name(path, images_arg))
            storage.write_bytes(destination, saliency.plot_gradcam([(image, heatmap, None, CLASS_NAMES[index],
                                                                     None)]))
            written.append(destination)
    return written


def _model_input(path: str, shard: ShardConfig) -> np.ndarray:
    """One file -> the pixels the model sees for it (imaging.model_input, as the serving signature does)."""
    try:
        image = imaging.model_input(tf.constant(storage.read_bytes(path)), shard.image_height, shard.image_width,
                                    shard.channels, shard.encoding, fit=shard.fit)
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        raise BadInputError(f"{path} is not a decodable image: {error}") from None
    return image.numpy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="runs/<run_id> (local folder or gs://)")
    parser.add_argument("images", metavar="IMAGE_OR_FOLDER", help="an image file or a folder searched recursively")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gradcam", metavar="OUT_DIR", help="also write each image's Grad-CAM heatmap here")
    args = parser.parse_args(argv)
    configure_logging("predict", run_id=args.run_dir.rstrip("/").rpartition("/")[2] or "-")
    log = get_logger(__name__)
    try:
        if args.batch_size < 1:
            raise BadInputError(f"--batch-size {args.batch_size} must be >= 1")
        paths = find_images(args.images)
        log.info("predicting", run_dir=args.run_dir, num_images=len(paths))
        for row in predict(args.run_dir, paths, args.batch_size):
            print(json.dumps(row), flush=True)
        if args.gradcam:
            written = write_gradcams(args.run_dir, paths, args.gradcam, args.images, args.batch_size)
            log.info("gradcam written", out_dir=args.gradcam, num_images=len(written))
    except BadInputError as error:
        log.error("bad input", error=str(error), exit_code=EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - log unexpected failures whole
        log.exception("predict failed", exit_code=EXIT_FAILURE)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
