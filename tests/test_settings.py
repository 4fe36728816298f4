"""Which keys decide which output, and which a resume may change: declared once in config.py, used by every stage."""

from __future__ import annotations

import dataclasses
import time

import pytest

from pneumonia.config import (
    FIXED,
    FREE,
    INTERIM,
    RECORDED,
    SHARDS,
    ShardConfig,
    SplitConfig,
    TrainConfig,
    declared_keys,
    load_config,
    setting,
)
from pneumonia.data import imaging, preprocess, shard, tfrecords, upstream
from pneumonia.errors import BadInputError
from pneumonia.training import fit

# What the stages wrote out by hand before config.py declared it (fit._PROCESS_KEYS, the launcher's
# ignore=, preprocess._fingerprint, shard.interim_settings, shard._output_settings).
BEFORE_RESUME_MAY_CHANGE = {
    "train.max_epochs_this_process", "shard.num_workers", "shard.index", "shard.marker_wait_timeout_s",
    "cluster.upstream_wait_timeout_s", "cluster.peer_wait_timeout_s", "cluster.image", "cluster.gpu_type",
    "cluster.namespace", "cluster.train_job_name", "cluster.train_service_name", "cluster.worker_port",
    # Added since, declared FREE where they were added: how often workers agree on a stop, what evaluate draws.
    "train.preemption_check_every_n_steps", "report.saliency_images",
    # Where a run's Jobs queue (Kueue) and how often a lost peer is forgiven: neither changes what is trained.
    "cluster.queue_name", "cluster.max_forgiven_restarts"}
BEFORE_LAUNCHER_IGNORES = {"cluster.image"}
BEFORE_INTERIM = {"data.max_uncompressed_bytes", "data.max_compression_ratio", "data.max_entries",
                  "data.max_entry_bytes", "split.mode", "split.seed", "split.val_fraction", "split.test_fraction",
                  "split.small_train_fraction", "split.small_val_fraction", "split.imbalance_warn_ratio"}
BEFORE_SHARDS = {"shard.image_height", "shard.image_width", "shard.channels", "shard.encoding", "shard.fit",
                 "shard.target_shard_bytes", "shard.min_shards_per_split", "cluster.num_workers", "split.seed"}

OTHER_CONFIG = ["shard.image_height=128", "shard.encoding=png", "shard.num_workers=3", "cluster.num_workers=2",
                "split.seed=7", "split.mode=pooled", "data.max_entries=99", "data.root=/elsewhere"]


def test_declared_keys_are_the_sets_the_stages_used_before():
    assert set(declared_keys(resume=(FREE, RECORDED))) == BEFORE_RESUME_MAY_CHANGE
    assert set(declared_keys(resume=(RECORDED,))) == BEFORE_LAUNCHER_IGNORES
    assert set(declared_keys(decides=INTERIM)) == BEFORE_INTERIM
    assert set(declared_keys(decides=SHARDS)) == BEFORE_SHARDS
    every = set(declared_keys())
    assert set(declared_keys(resume=(FIXED,))) == every - BEFORE_RESUME_MAY_CHANGE


@pytest.mark.parametrize("overrides", [[], OTHER_CONFIG])
def test_derived_settings_equal_what_the_stages_computed_before(overrides: list[str]):
    config = load_config(None, overrides)
    # shard._output_settings as written out before: the shards' fingerprint must not change.
    s = config.shard
    before_shards = {"format_version": tfrecords.FORMAT_VERSION, "image_height": s.image_height,
                     "image_width": s.image_width, "channels": s.channels, "encoding": s.encoding, "fit": s.fit,
                     "jpeg_quality": imaging.JPEG_QUALITY if s.encoding == "jpeg" else None,
                     "png_compression": imaging.PNG_COMPRESSION if s.encoding == "png" else None,
                     "resize": imaging.RESIZE_METHOD, "target_shard_bytes": s.target_shard_bytes,
                     "min_shards_per_split": s.min_shards_per_split,
                     "cluster_num_workers": config.cluster.num_workers, "split_seed": config.split.seed}
    assert shard._output_settings(config) == before_shards
    # preprocess._fingerprint and shard.interim_settings as written out before.
    data = dataclasses.asdict(config.data)
    del data["root"], data["archive"]
    before_interim = {"data": data, "split": dataclasses.asdict(config.split)}
    assert preprocess._fingerprint(config, "ab" * 32) == {"version": preprocess.PREPROCESS_VERSION,
                                                          "archive_sha256": "ab" * 32, **before_interim}
    assert upstream.interim_settings(config) == before_interim


@dataclasses.dataclass(frozen=True)
class ShardWithSharpening(ShardConfig):
    sharpen: float = setting(0.0, decides=(SHARDS,))


@dataclasses.dataclass(frozen=True)
class SplitWithNewRule(SplitConfig):
    min_images_per_patient: int = setting(1, decides=(INTERIM,))


@dataclasses.dataclass(frozen=True)
class TrainWithNewKeys(TrainConfig):
    log_every_n_steps: int = setting(100, resume=FREE)
    label_smoothing: float = 0.0  # no metadata: belongs to the run


def test_a_new_key_declared_on_its_field_flows_into_every_stage():
    base = load_config(None, ["train.run_id=r"])
    sharpened = base.replace(shard=ShardWithSharpening(sharpen=0.5))
    assert "shard.sharpen" in declared_keys(sharpened, decides=SHARDS)
    assert shard._output_settings(sharpened)["sharpen"] == 0.5
    assert (shard.compute_fingerprint("0" * 64, base.replace(shard=ShardWithSharpening()))
            != shard.compute_fingerprint("0" * 64, sharpened))

    split_rule = base.replace(split=SplitWithNewRule(min_images_per_patient=2))
    assert upstream.interim_settings(split_rule)["split"]["min_images_per_patient"] == 2
    assert (preprocess._fingerprint(base.replace(split=SplitWithNewRule()), "0" * 64)
            != preprocess._fingerprint(split_rule, "0" * 64))
    # An interim marker from before the key existed does not record it: shard and train wait for preprocess.
    made_before = {"config": {"data": dataclasses.asdict(base.data), "split": dataclasses.asdict(base.split)}}
    assert upstream.interim_mismatches(made_before, split_rule) == [
        ("split.min_images_per_patient", upstream.NOT_RECORDED, 2)]

    trained = base.replace(train=TrainWithNewKeys()).to_dict()
    resumed = base.replace(train=TrainWithNewKeys(log_every_n_steps=10, max_epochs_this_process=1))
    assert fit.changed_keys(trained, resumed) == []
    smoothed = base.replace(train=TrainWithNewKeys(label_smoothing=0.1))
    assert fit.changed_keys(trained, smoothed) == ["train.label_smoothing"]


def test_wait_until_current_returns_once_the_upstream_catches_up_and_gives_up_past_the_deadline():
    answers = iter([(None, ["old"]), (None, ["old"]), ("marker", [])])
    assert upstream.wait_until_current(lambda: next(answers), deadline=time.monotonic() + 30, poll_s=0.01,
                                       give_up=lambda *_: AssertionError("gave up"), waiting_for="a test") == "marker"
    calls = []

    def lagging():
        calls.append(time.monotonic())
        return "stale", ["split.seed=1, want 2"]

    started = time.monotonic()
    with pytest.raises(BadInputError, match=r"stale: split\.seed=1, want 2"):
        upstream.wait_until_current(lagging, deadline=started + 0.2, poll_s=0.05, waiting_for="a test",
                                    give_up=lambda result, problems: BadInputError(f"{result}: {problems[0]}"))
    assert 2 <= len(calls) <= 10 and time.monotonic() - started < 5
