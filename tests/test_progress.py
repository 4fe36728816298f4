"""pneumonia.progress: log lines at the configured cadence off a terminal, a live bar on one, with a
fake clock so the cadence is exact; and configure_logging choosing between the two."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import structlog
import tensorflow as tf
import tf_keras as keras
from structlog.testing import capture_logs

from pneumonia import progress
from pneumonia.logs import configure_logging
from pneumonia.training.step_progress import StepProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _restore_progress() -> Iterator[None]:
    saved = progress.settings()
    yield
    progress._settings = saved  # noqa: SLF001 - process-wide state, put back for the next test
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_a_fast_loop_logs_every_few_percent_but_not_closer_than_the_minimum_gap():
    clock = FakeClock()
    progress.configure(live=False, every_s=10.0, every_percent=10.0, min_gap_s=2.0, clock=clock)
    with capture_logs() as events:
        with progress.Progress("preprocess", 100, unit="images") as bar:
            for _ in range(100):
                clock.advance(0.1)  # 10 images/s: 10 % every second, but lines at most every 2 s
                bar.update()
    lines = [e for e in events if e["event"] == "progress"]
    assert [e["done"] for e in lines] == [20, 40, 60, 80]
    assert [e["event"] for e in events].count("progress done") == 1
    first = lines[0]
    assert first["task"] == "preprocess" and first["total"] == 100 and first["percent"] == 20.0
    assert first["images_per_s"] == pytest.approx(10.0) and first["eta_s"] == pytest.approx(8.0)
    assert events[-1]["done"] == 100 and events[-1]["eta_s"] == 0


def test_a_slow_loop_logs_every_few_seconds():
    clock = FakeClock()
    progress.configure(live=False, every_s=10.0, every_percent=10.0, min_gap_s=2.0, clock=clock)
    with capture_logs() as events:
        bar = progress.Progress("shard", 1000, unit="records")
        for _ in range(10):
            clock.advance(4.0)  # 0.25 records/s: never 10 %, so time alone sets the cadence
            bar.update()
    times = [e["elapsed_s"] for e in events if e["event"] == "progress"]
    assert times == [12.0, 24.0, 36.0]
    assert events[0]["records_per_s"] == 0.2 and events[0]["eta_s"] == pytest.approx(997 * 4.0)


def test_rates_in_other_units_and_extra_fields_reach_the_line():
    clock = FakeClock()
    progress.configure(live=False, every_s=1.0, clock=clock)
    with capture_logs() as events:
        with progress.Progress("epoch 1/3", 10, unit="steps", rate_unit="images", rate_scale=32, epoch=0) as bar:
            for _ in range(10):
                clock.advance(0.5)
                bar.update()
    done = events[-1]
    assert done["event"] == "progress done" and done["unit"] == "steps" and done["epoch"] == 0
    assert done["images_per_s"] == 64.0 and "steps_per_s" not in done


def test_track_counts_each_item_as_its_size():
    clock = FakeClock()
    progress.configure(live=False, every_s=1.0, clock=clock)
    batches = [[0] * 8, [0] * 8, [0] * 3]
    with capture_logs() as events:
        seen = []
        for batch in progress.track(batches, "evaluate", 19, count=len):
            clock.advance(2.0)
            seen.append(batch)
    assert seen == batches
    # Counted when handed out: the first batch at 0 s (too soon for a line), the last one closes.
    assert [(e["event"], e["done"]) for e in events] == [("progress", 16), ("progress done", 19)]


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_nothing_is_logged():
    clock = FakeClock()
    stream = io.StringIO()
    progress.configure(live=True, redraw_s=0.25, stream=stream, clock=clock)
    with capture_logs() as events:
        with progress.Progress("preprocess", 50) as bar:
            for _ in range(50):
                clock.advance(0.0625)  # a redraw every 4th image (binary fractions: exact sums)
                bar.update()
    assert events == []
    text = stream.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 12 + 1  # at 4, 8, ... 48 images, then the final frame
    assert text.endswith("\n") and text.count("\n") == 1
    assert frames[-1].startswith("preprocess [" + "#" * progress.BAR_WIDTH + "] 50/50 100%")
    assert "16 images/s" in frames[-1] and "0:00 left" in frames[-1]
    assert "] 4/50" in frames[0] and "0:03 left" in frames[0]


def test_configure_logging_picks_the_bar_for_a_console_and_lines_for_json():
    configure_logging("preprocess", run_id="r", json_logs=True)
    assert progress.settings().live is False
    configure_logging("preprocess", run_id="r", json_logs=False)
    assert progress.settings().live is True


def test_training_reports_steps_within_each_epoch_and_images_per_second():
    clock = FakeClock()
    progress.configure(live=False, every_s=1.0, min_gap_s=1.0, clock=clock)

    class Tick(keras.callbacks.Callback):  # each step takes half a second on the fake clock
        def on_train_batch_begin(self, batch, logs=None):
            clock.advance(0.5)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    data = tf.data.Dataset.from_tensor_slices((np.ones((8, 3), np.float32), np.eye(2, dtype=np.float32)[[0, 1] * 4]))
    with capture_logs() as events:
        model.fit(data.batch(2).repeat(), epochs=2, steps_per_epoch=4, verbose=0,
                  callbacks=[Tick(), StepProgress(steps_per_epoch=4, global_batch_size=2, epochs=2)])
    summary = [(e["event"], e["task"], e["done"], e["epoch"]) for e in events if e.get("task", "").startswith("train")]
    assert summary == [("progress", "train epoch 1/2", 2, 0), ("progress done", "train epoch 1/2", 4, 0),
                       ("progress", "train epoch 2/2", 2, 1), ("progress done", "train epoch 2/2", 4, 1)]
    done = [e for e in events if e["event"] == "progress done"]
    assert all(e["images_per_s"] == 4.0 and e["total"] == 4 and e["unit"] == "steps" for e in done)
