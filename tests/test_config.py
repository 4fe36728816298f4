"""The typed config: defaults, YAML and --set overrides, strict errors that name the key, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumonia.config import PipelineConfig, load_config
from pneumonia.errors import BadInputError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    config = load_config()
    assert config == PipelineConfig().validate()
    assert config.split.mode == "official"
    assert config.data.max_entry_bytes == 256 * 1024**2


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  seed: 7\n  mode: pooled\nshard:\n  image_height: 64\n")
    config = load_config(path)
    assert (config.split.seed, config.split.mode, config.shard.image_height) == (7, "pooled", 64)
    assert config.shard.image_width == PipelineConfig().shard.image_width


def test_set_overrides_win_over_yaml_and_parse_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  seed: 7\n")
    config = load_config(path, ["split.seed=9", "split.val_fraction=0.25", "model.mixed_precision=true",
                                "model.dense_units=[8, 4]", "data.root=gs://bucket/prefix", "train.run_id=20240101"])
    assert config.split.seed == 9
    assert config.split.val_fraction == 0.25
    assert config.model.mixed_precision is True
    assert config.model.dense_units == (8, 4)
    assert config.data.root == "gs://bucket/prefix"
    assert config.train.run_id == "20240101"  # YAML reads digits as an int; the str field gets them back


@pytest.mark.parametrize(("overrides", "names"), [
    (["bogus.key=1"], ["bogus"]),
    (["split.sede=1"], ["split.sede"]),
    (["split.seed=abc"], ["split.seed", "abc"]),
    (["train.epochs=1.5"], ["train.epochs", "1.5"]),
    (["split.val_fraction=1.5"], ["split.val_fraction", "1.5"]),
    (["split.test_fraction=-0.1"], ["split.test_fraction", "-0.1"]),
    (["split.small_train_fraction=0"], ["split.small_train_fraction", "0"]),
    (["split.mode=pooled", "split.val_fraction=0.6", "split.test_fraction=0.5"],
     ["split.val_fraction + split.test_fraction", "1.1"]),
    (["shard.image_height=-64"], ["shard.image_height", "-64"]),
    (["data.max_uncompressed_bytes=-1"], ["data.max_uncompressed_bytes", "-1"]),
    (["data.max_entry_bytes=0"], ["data.max_entry_bytes", "0"]),
    (["split.mode=random"], ["split.mode", "random"]),
    (["seed=1"], ["section.key=value"]),
    (["train.run_id=.."], ["train.run_id", ".."]),  # would put the run's files in the data root
    (["train.run_id=."], ["train.run_id"]),
    (["train.run_id=a/b"], ["train.run_id", "a/b"]),
    (["train.seed=0"], ["train.seed", "0"]),  # TensorFlow's global seed 0 breaks tf.data's seeded shuffles
])
def test_bad_values_raise_config_error_naming_the_key(overrides, names):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    for name in names:
        assert name in str(caught.value)
    assert isinstance(caught.value, BadInputError)  # exit code 2


def test_unknown_key_in_yaml_and_unreadable_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shard:\n  image_hieght: 64\n")
    with pytest.raises(ConfigError, match="shard.image_hieght"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_to_yaml_round_trips(tmp_path):
    config = load_config(None, ["split.mode=pooled", "split.seed=3", "model.dense_units=[16]",
                                "model.xla=false", "train.run_id=abc-1", "cluster.gpu_type=nvidia-tesla-t4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert load_config(None, [f"data.root={config.data.root}"]).data.root == config.data.root


def test_demo_config_is_tiny_and_local_config_is_the_real_one():
    demo = load_config(REPO / "jobs" / "configs" / "demo.yaml")
    assert demo.shard.size_dir == "64x64x1" and demo.model.name == "small_cnn" and demo.model.weights == "none"
    assert demo.data.archive == "data/demo/raw/demo-chest-xray.zip"
    local = load_config(REPO / "jobs" / "configs" / "local.yaml")
    assert local.shard.size_dir == "256x256x1" and local.model.name == "efficientnetv2b0"
    assert local.model.weights == "imagenet" and local.data.root == "data/local"


def test_set_keeps_text_fields_verbatim():
    # YAML alone would turn run id 0042 into the octal number 34, and "on" into True.
    config = load_config(None, ["train.run_id=0042", "model.weights=on"])
    assert config.train.run_id == "0042"
    assert config.model.weights == "on"


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 reads 1e-4 as a string; the docs write learning rates that way (docs/configuration.md).
    assert load_config(None, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(None, ["train.learning_rate=fast"])
