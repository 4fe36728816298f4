"""Where the model looks: Grad-CAM on the last convolutional activation, and a check for shortcuts.

Grad-CAM (Selvaraju et al., 2017) weighs the channels of the backbone's last convolutional
activation by the mean gradient of one class's logit, and keeps the positive part. Both models of
`pneumonia.model.zoo` keep their feature extractor in one nested layer (`backbone`), so the map is
built the same way for both: the outer layers up to the backbone, a model from the backbone's own
inputs to its last activation (and its output), and the head applied inside the tape.

The shortcut check: markers and burned-in text sit in the border of a film. A class whose saliency
lies mostly in the border of the image content (the shard stage's padding excluded) was probably
told apart by them rather than by the lungs. Grad-CAM alone misses a marker the model uses: the
class the marked one is drawn like finds its evidence in the same corner (the marker's absence), so
no class stands out. The check therefore also hides the border (each image's band filled with its
own median) and scores the test set again: a class whose recall collapses without its border was
told apart there. Neither can see a shortcut spread over the whole film (a brightness shift).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras
from matplotlib import colormaps
from matplotlib.figure import Figure

from pneumonia.data import imaging, tfrecords
from pneumonia.model.zoo import BACKBONE_LAYER

METHOD = "grad-cam"
# The border band: the outer 15 % of each side of the image content, where laterality markers,
# rulers and burned-in text sit on chest films and where no lung finding of this data set lies.
BORDER_FRACTION = 0.15
# The saliency mass is the map where it reaches half its peak over the content: the faint rest,
# spread over the whole film, would pull every class towards the band's share of the area (measured
# on the demo with a planted corner marker: 57 % for the marked class with it, 80 % without, while
# the other classes stay near 25 % and the plain demo's classes at 5-25 %).
SALIENT_LEVEL = 0.5
# The band is 1 - 0.7 x 0.7 = 51 % of the content's area, so a map with no preference puts about
# half its mass there, while maps that follow the lungs (the plain demo: 5-25 %) put much less.
# More than half in the border means the class is looked for there rather than in the lungs...
BORDER_SHARE_WARN = 0.5
# ...and 0.15 above the other classes' mean says it is that class's own cue, not a model that looks
# everywhere (then every class passes the threshold together, and none stands out).
BORDER_SHARE_MARGIN = 0.15
# Hiding the border: a class whose recall falls by this much without it, and by BORDER_RECALL_MARGIN more
# than the other classes' mean fall, is flagged. Measured on the demo (64 px, small_cnn): a planted
# square, "L", "R" or "PORTABLE" in any corner or along any edge takes its class from 100 % to 0-10 %;
# the plain demo's classes lose 0-20 %.
BORDER_RECALL_DROP_WARN = 0.5
BORDER_RECALL_MARGIN = 0.3
LIMIT = ("Its limit: both tests look at the border; a shortcut spread over the whole film (such as a brightness "
         "or contrast shift between classes, or a scanner's noise) is invisible to them.")
PLOT_DPI = 100
PAIRS_PER_ROW = 3
HEATMAP_ALPHA = 0.45

GradCam = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def last_conv_activation(backbone: keras.Model) -> keras.layers.Layer:
    """The backbone's last layer with a 4-D output that is an activation (ReLU, swish, ...)."""
    for layer in reversed(backbone.layers):
        if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)) and len(layer.output.shape) == 4:
            return layer
    raise ValueError(f"backbone {backbone.name!r} has no 4-D activation layer for Grad-CAM")


def split_at_last_activation(model: keras.Model) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """A function images -> (last convolutional activation [B, h, w, C], class logits [B, K]).

    The outer layers up to the backbone, the backbone from its own inputs to its last activation and
    its output, then the head with the final Dense layer applied without its softmax. Every layer
    runs with training=False (BatchNorm statistics, no dropout).
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    # The backbone is called once in the outer model: its one inbound node holds the outer tensor.
    outer_input = backbone.inbound_nodes[0].input_tensors
    to_backbone = None if outer_input is model.inputs[0] else keras.Model(model.inputs, outer_input)
    activation = last_conv_activation(backbone)
    features = keras.Model(backbone.inputs, [activation.output, backbone.output])
    head = model.layers[model.layers.index(backbone) + 1:]
    final = head.pop()
    if not isinstance(final, keras.layers.Dense):
        raise ValueError(f"model {model.name!r} must end in a Dense layer for Grad-CAM, not {final.name!r}")

    def forward(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = images if to_backbone is None else to_backbone(images, training=False)
        conv, x = features(x, training=False)
        for layer in head:
            x = layer(x, training=False)
        return conv, tf.matmul(tf.cast(x, final.kernel.dtype), final.kernel) + final.bias

    return forward


def build_gradcam(model: keras.Model) -> GradCam:
    """A function (images [B, H, W, C] in [0, 1], class indices [B]) -> heatmaps [B, H, W] in [0, 1].

    Gradients are of the chosen class's logit, not of its softmax probability: the softmax couples
    the classes, and a confident prediction's probability saturates, leaving near-zero gradients.
    """
    forward = split_at_last_activation(model)
    height, width = (int(v) for v in model.input_shape[1:3])

    @tf.function(reduce_retracing=True)
    def gradcam(images: tf.Tensor, class_indices: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            conv, logits = forward(images)
            chosen = tf.gather(logits, tf.cast(class_indices, tf.int32), axis=1, batch_dims=1)
        gradients = tape.gradient(chosen, conv)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        heatmap = tf.nn.relu(tf.reduce_sum(channel_weights * conv, axis=-1))
        heatmap = tf.image.resize(heatmap[..., tf.newaxis], (height, width), method="bilinear")[..., 0]
        peak = tf.reduce_max(heatmap, axis=(1, 2), keepdims=True)
        return tf.math.divide_no_nan(heatmap, peak)

    return gradcam


def content_box(original_height: int, original_width: int, height: int, width: int,
                fit: str = "pad") -> tuple[int, int, int, int]:
    """(top, left, content height, content width) of a source image inside its shard image.

    The same fit and centring as the shard stage: a cropped film fills the whole image; a padded
    one sits where `imaging.fitted_size` and pad_to_bounding_box put it.
    """
    if fit == "crop":
        return 0, 0, height, width
    new_height, new_width = (int(v) for v in imaging.fitted_size(original_height, original_width, height, width))
    return (height - new_height) // 2, (width - new_width) // 2, new_height, new_width


def border_share(heatmap: np.ndarray, box: tuple[int, int, int, int]) -> float | None:
    """The share of the saliency mass inside the content box (the map where it reaches SALIENT_LEVEL
    of its peak there) that lies in the border band; None for a map with no mass (nothing to judge)."""
    top, left, content_height, content_width = box
    content = np.asarray(heatmap, np.float64)[top:top + content_height, left:left + content_width]
    if content.size == 0 or content.max() <= 0:
        return None
    content = np.where(content >= SALIENT_LEVEL * content.max(), content, 0.0)
    total = content.sum()
    if total <= 0:
        return None
    band_y = int(round(BORDER_FRACTION * content_height))
    band_x = int(round(BORDER_FRACTION * content_width))
    inner = content[band_y:content_height - band_y, band_x:content_width - band_x].sum()
    return float(1.0 - inner / total)


def shortcut_warnings(shares: Mapping[str, float | None]) -> list[str]:
    """A warning per class whose border share passes BORDER_SHARE_WARN and stands BORDER_SHARE_MARGIN
    above the mean of the other classes' shares."""
    warnings = []
    for name, share in shares.items():
        others = [value for other, value in shares.items() if other != name and value is not None]
        if share is None or share < BORDER_SHARE_WARN:
            continue
        if others and share - float(np.mean(others)) < BORDER_SHARE_MARGIN:
            continue
        warnings.append(f"{name}: {share * 100:.0f} % of its saliency lies in the image border (shortcut?)")
    return warnings


def hide_border(images: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """Images [B, H, W, C] with the border band of each one's content box (BORDER_FRACTION of each side)
    filled with that band's median: a marker or text there is gone, the film's overall level stays."""
    hidden = np.array(images, copy=True)
    for image, (top, left, content_height, content_width) in zip(hidden, boxes, strict=True):
        band_y = int(round(BORDER_FRACTION * content_height))
        band_x = int(round(BORDER_FRACTION * content_width))
        content = image[top:top + content_height, left:left + content_width]
        band = np.ones(content.shape[:2], bool)
        band[band_y:content_height - band_y, band_x:content_width - band_x] = False
        content[band] = np.median(content[band], axis=0)
    return hidden


def recall_drop_warnings(recall: Mapping[str, float | None], hidden: Mapping[str, float | None]) -> list[str]:
    """A warning per class whose recall falls by BORDER_RECALL_DROP_WARN or more with the border hidden,
    and by BORDER_RECALL_MARGIN more than the other classes' mean fall."""
    drops = {name: recall[name] - hidden[name] for name in recall
             if recall[name] is not None and hidden.get(name) is not None}
    warnings = []
    for name, drop in drops.items():
        others = [value for other, value in drops.items() if other != name]
        if drop < BORDER_RECALL_DROP_WARN or (others and drop - float(np.mean(others)) < BORDER_RECALL_MARGIN):
            continue
        warnings.append(f"{name}: recall falls from {recall[name] * 100:.0f} % to {hidden[name] * 100:.0f} % with "
                        "the image border hidden (shortcut?)")
    return warnings


def pick_examples(labels: np.ndarray, probabilities: np.ndarray, limit: int) -> list[int]:
    """Indices to draw: the errors first (most confident first), then correct ones of each class in
    turn (most confident first), up to `limit`."""
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    errors = sorted(np.flatnonzero(predictions != labels), key=lambda i: -confidence[i])
    picked = [int(i) for i in errors[:limit]]
    queues = [sorted(np.flatnonzero((predictions == labels) & (labels == k)), key=lambda i: -confidence[i])
              for k in range(probabilities.shape[1])]
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(int(queue.pop(0)))
    return picked


def read_geometry(shard_paths: Iterable[str]) -> dict[str, tuple[int, int]]:
    """source path -> (original height, original width) for every record of the given shards."""
    return {record.source_path: (record.original_height, record.original_width)
            for path in shard_paths for _, record in tfrecords.read_metadata(path)}


def check_test_set(model: keras.Model, batches: Iterable[Any], labels: np.ndarray, probabilities: np.ndarray,
                   paths: Sequence[str], geometry: Mapping[str, tuple[int, int]], class_names: Sequence[str],
                   num_images: int, fit: str = "pad") -> tuple[dict[str, Any], bytes | None]:
    """(metrics.json's `saliency`, gradcam.png's bytes or None when num_images is 0) for a scored test set.

    `batches` yields (images, one-hot labels, metadata) in the order of `labels`, `probabilities` and
    `paths` (evaluate's second pass over the same deterministic dataset). Each image's map is taken for
    its true class: the check asks where the model finds the evidence for a class on that class's
    images. The figure shows the map of the predicted class: where the model looked for its answer.
    """
    gradcam = build_gradcam(model)
    infer = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    predictions = probabilities.argmax(axis=1)
    predicted_hidden = np.zeros_like(predictions)
    picked = pick_examples(labels, probabilities, num_images)
    drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    shares: list[list[float]] = [[] for _ in class_names]
    start = 0
    for images, _, metadata in batches:
        count = int(images.shape[0])
        index = np.arange(start, start + count)
        batch_paths = [p.decode("utf-8") for p in metadata["source_path"].numpy()]
        if batch_paths != list(paths[start:start + count]):
            raise ValueError("the saliency pass read the test set in another order than the predictions")
        heatmaps = gradcam(images, tf.constant(labels[index])).numpy()
        height, width = heatmaps.shape[1:]
        boxes = [content_box(*geometry[path], height, width, fit) for path in batch_paths]
        for offset, box in enumerate(boxes):
            share = border_share(heatmaps[offset], box)
            if share is not None:
                shares[labels[start + offset]].append(share)
        hidden = tf.constant(hide_border(images.numpy(), boxes), images.dtype)
        predicted_hidden[index] = np.argmax(infer(hidden).numpy(), axis=1)
        wanted = [offset for offset in range(count) if start + offset in picked]
        if wanted:
            chosen = tf.constant(predictions[index[wanted]])
            answer_maps = gradcam(tf.gather(images, wanted), chosen).numpy()
            for position, offset in enumerate(wanted):
                drawn[start + offset] = (images[offset].numpy(), answer_maps[position])
        start += count
    per_class = {name: (float(np.mean(values)) if values else None) for name, values in zip(class_names, shares,
                                                                                            strict=True)}
    recall, recall_hidden = {}, {}
    for number, name in enumerate(class_names):
        members = labels == number
        recall[name] = float(np.mean(predictions[members] == number)) if members.any() else None
        recall_hidden[name] = float(np.mean(predicted_hidden[members] == number)) if members.any() else None
    summary = {"method": METHOD, "border_share": per_class, "recall": recall, "recall_border_hidden": recall_hidden,
               "warnings": shortcut_warnings(per_class) + recall_drop_warnings(recall, recall_hidden)}
    if not picked:
        return summary, None
    panels = [(drawn[i][0], drawn[i][1], class_names[labels[i]], class_names[predictions[i]],
               float(probabilities[i, predictions[i]])) for i in picked]
    return summary, plot_gradcam(panels)


def plot_gradcam(panels: Sequence[tuple[np.ndarray, np.ndarray, str | None, str, float | None]]) -> bytes:
    """Each (image [H, W, C] in [0, 1], heatmap [H, W], true class or None, predicted class,
    probability or None) as the image beside its heatmap overlay; errors titled in red."""
    rows = -(-len(panels) // PAIRS_PER_ROW)
    columns = 2 * min(len(panels), PAIRS_PER_ROW)
    figure = Figure(figsize=(2.0 * columns, 2.3 * rows))
    jet = colormaps["jet"]
    for number, (image, heatmap, true, predicted, probability) in enumerate(panels):
        picture = image[..., 0] if image.shape[-1] == 1 else image
        cmap = "gray" if image.shape[-1] == 1 else None
        left = figure.add_subplot(rows, columns, 2 * number + 1)
        right = figure.add_subplot(rows, columns, 2 * number + 2)
        left.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0)
        right.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0)
        right.imshow(jet(heatmap)[..., :3], alpha=HEATMAP_ALPHA)
        wrong = true is not None and true != predicted
        title = (f"true {true}\n" if true is not None else "") + f"pred {predicted}"
        title += f" ({probability:.2f})" if probability is not None else ""
        left.set_title(title, fontsize=8, color="red" if wrong else "black")
        right.set_title("Grad-CAM", fontsize=8)
        for axes in (left, right):
            axes.set_xticks([])
            axes.set_yticks([])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def render_markdown(summary: Mapping[str, Any]) -> str:
    """report.md's "Shortcut check" section."""
    lines = ["", "## Shortcut check", "",
             f"Grad-CAM on the last convolutional activation, each test image's map for its true class; the "
             f"share of each class's saliency in the border of the image content (outer "
             f"{BORDER_FRACTION * 100:.0f} % of each side, padding excluded), where markers and burned-in text sit; "
             f"the mass counted is where a map reaches {SALIENT_LEVEL * 100:.0f} % of its peak. "
             f"A map with no preference puts about half its mass there; a warning when a class passes "
             f"{BORDER_SHARE_WARN * 100:.0f} % and stands {BORDER_SHARE_MARGIN * 100:.0f} points above the "
             "others' mean. Then the border is hidden (filled with its median) and the test set scored again: "
             f"a warning when a class's recall falls by {BORDER_RECALL_DROP_WARN * 100:.0f} points and "
             f"{BORDER_RECALL_MARGIN * 100:.0f} more than the others' (Grad-CAM misses a marker whose absence is "
             "the look-alike class's evidence). `gradcam.png` shows the errors first, then correct examples of "
             "each class.", "",
             "| class | saliency in the border | recall | recall, border hidden |", "| --- | --- | --- | --- |"]
    recall, hidden = summary.get("recall", {}), summary.get("recall_border_hidden", {})
    for name, share in summary["border_share"].items():
        cells = [share, recall.get(name), hidden.get(name)]
        lines.append(f"| {name} | " + " | ".join("n/a" if value is None else f"{value * 100:.0f} %" for value in cells)
                     + " |")
    lines += ["", LIMIT, ""]
    warnings = summary["warnings"]
    lines += [f"- **Warning**: {text}" for text in warnings] or ["No class stands out: no shortcut found."]
    return "\n".join(lines) + "\n"
