"""The pipeline's one typed configuration: defaults in code, YAML and `--set` override them.

Unknown keys, wrong types and impossible values raise ConfigError naming the key, so a typo in a
YAML file fails before any work starts instead of silently running with a default.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import secrets
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumonia.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("normal", "bacteria", "virus")

# What a key means to the stages is declared once, on its field (`setting`), and derived everywhere
# else: the stages' fingerprints, the resume check, the launcher's check of a running run's config.
# `decides`: the stage outputs whose content it shapes beyond their inputs (a changed value redoes them).
INTERIM = "interim"  # preprocess: interim/ and splits/split.json
SHARDS = "shards"  # shard: the TFRecord files (their bytes and order; the split manifest is an input)
# `resume`: FIXED (the default) belongs to the run: resuming with another value is refused.
# FREE steers one process or says where it runs (waits, writers, image, GPU type): a resume may change it.
# RECORDED is FREE and read by no pod (the Job spec holds the live value), so it may also differ in the
# ConfigMap under running pods.
FIXED, FREE, RECORDED = "fixed", "free", "recorded"


def setting(default: Any, *, decides: tuple[str, ...] = (), resume: str = FIXED) -> Any:
    """A config field with what it decides declared on it (see INTERIM, SHARDS, FIXED, FREE, RECORDED)."""
    return field(default=default, metadata={"decides": frozenset(decides), "resume": resume})


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives. `root` and `archive` are local paths or gs:// URLs."""

    root: str = "data"
    archive: str = ""
    # Limits that make an untrusted archive safe to read (zip bombs, runaway listings).
    max_uncompressed_bytes: int = setting(8 * 1024**3, decides=(INTERIM,))
    max_compression_ratio: float = setting(200.0, decides=(INTERIM,))
    max_entries: int = setting(100_000, decides=(INTERIM,))
    # One entry's bytes (declared and really inflated): chest X-rays are a few MiB, so this only
    # stops a single huge entry from being held in memory.
    max_entry_bytes: int = setting(256 * 1024**2, decides=(INTERIM,))

    def validate(self) -> None:
        _require(bool(self.root), "data.root", self.root, "a local folder or gs://bucket/prefix")
        _require(self.max_uncompressed_bytes > 0, "data.max_uncompressed_bytes", self.max_uncompressed_bytes, "> 0")
        _require(self.max_compression_ratio > 1, "data.max_compression_ratio", self.max_compression_ratio, "> 1")
        _require(self.max_entries > 0, "data.max_entries", self.max_entries, "> 0")
        _require(self.max_entry_bytes > 0, "data.max_entry_bytes", self.max_entry_bytes, "> 0")


@dataclass(frozen=True)
class SplitConfig:
    """How images become train / val / test: always grouped by patient, stratified by class.

    `official` keeps the archive's test/ folder as the test set (the published benchmark) and
    carves val out of train/ + val/; `pooled` pools everything (the notebook's way) and cuts
    train / val / test by `val_fraction` and `test_fraction`.
    """

    mode: str = setting("official", decides=(INTERIM,))
    # The shard stage orders records by it too.
    seed: int = setting(42, decides=(INTERIM, SHARDS))
    val_fraction: float = setting(0.10, decides=(INTERIM,))
    test_fraction: float = setting(0.15, decides=(INTERIM,))  # pooled mode only
    # Quick-experiment subsets (the notebook used 0.20 and 0.15); 1.0 keeps everything.
    small_train_fraction: float = setting(1.0, decides=(INTERIM,))
    small_val_fraction: float = setting(1.0, decides=(INTERIM,))
    imbalance_warn_ratio: float = setting(3.0, decides=(INTERIM,))

    def validate(self) -> None:
        _require(self.mode in ("official", "pooled"), "split.mode", self.mode, "one of: official, pooled")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"split.{name}", value, "a fraction in [0, 1)")
        for name in ("small_train_fraction", "small_val_fraction"):
            value = getattr(self, name)
            _require(0.0 < value <= 1.0, f"split.{name}", value, "a fraction in (0, 1]")
        if self.mode == "pooled":
            total = self.val_fraction + self.test_fraction
            _require(total < 1.0, "split.val_fraction + split.test_fraction", total, "below 1 (train needs the rest)")
        _require(self.imbalance_warn_ratio >= 1.0, "split.imbalance_warn_ratio", self.imbalance_warn_ratio, ">= 1")


@dataclass(frozen=True)
class ShardConfig:
    """TFRecord shards: image size, encoding, how many files, and which of them this worker writes."""

    image_height: int = setting(256, decides=(SHARDS,))
    image_width: int = setting(256, decides=(SHARDS,))
    channels: int = setting(1, decides=(SHARDS,))
    # jpeg (quality 95) measured faster to write, 2-3x faster to read and half the bytes of png, at
    # a PSNR of 41 dB or more against the resized source (bench/README.md); png stays for exactness.
    encoding: str = setting("jpeg", decides=(SHARDS,))
    # How a film of another shape than image_height x image_width fits it: crop (scale to cover, cut
    # the centre) or pad (letterbox on black). Real films' shape tells their class (normal width /
    # height median 1.21, pneumonia ~1.5), and letterboxing hands that to the model: on the demo
    # archive with classes told apart by shape alone, pad trains to a high kappa, crop to chance
    # (docs/shortcuts.md). crop cuts the sides of wide films; pad keeps them.
    fit: str = setting("crop", decides=(SHARDS,))
    # Target bytes per shard file; the count is then raised to at least min_shards_per_split
    # and to the number of training workers, so FILE autosharding always has files to hand out.
    target_shard_bytes: int = setting(100 * 1024**2, decides=(SHARDS,))
    min_shards_per_split: int = setting(4, decides=(SHARDS,))
    # Who writes which shard, not what the shards hold (the shards' fingerprint covers that).
    index: int = setting(-1, resume=FREE)  # -1: take it from the cluster (JOB_COMPLETION_INDEX), else 0
    num_workers: int = setting(1, resume=FREE)
    marker_wait_timeout_s: int = setting(1800, resume=FREE)
    roundtrip_samples_per_class: int = 2
    roundtrip_min_psnr_db: float = 35.0  # only used for lossy (jpeg) encoding

    @property
    def size_dir(self) -> str:
        return f"{self.image_height}x{self.image_width}x{self.channels}"

    def validate(self) -> None:
        for name in ("image_height", "image_width"):
            value = getattr(self, name)
            _require(16 <= value <= 4096, f"shard.{name}", value, "between 16 and 4096 pixels")
        _require(self.channels in (1, 3), "shard.channels", self.channels, "1 (grayscale) or 3 (RGB)")
        _require(self.encoding in ("png", "jpeg"), "shard.encoding", self.encoding, "png or jpeg")
        _require(self.fit in ("crop", "pad"), "shard.fit", self.fit, "crop (centre crop to the target's shape) or pad")
        _require(self.target_shard_bytes > 0, "shard.target_shard_bytes", self.target_shard_bytes, "> 0")
        _require(self.min_shards_per_split >= 1, "shard.min_shards_per_split", self.min_shards_per_split, ">= 1")
        _require(self.num_workers >= 1, "shard.num_workers", self.num_workers, ">= 1")
        _require(self.index >= -1, "shard.index", self.index, ">= 0 (or -1 for the cluster's index)")
        _require(self.index < self.num_workers, "shard.index", self.index, f"< shard.num_workers ({self.num_workers})")
        _require(self.marker_wait_timeout_s >= 0, "shard.marker_wait_timeout_s", self.marker_wait_timeout_s, ">= 0")
        _require(self.roundtrip_samples_per_class >= 1, "shard.roundtrip_samples_per_class",
                 self.roundtrip_samples_per_class, ">= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Which network. `weights` is imagenet, none, or a path to a weights file (offline clusters)."""

    name: str = "efficientnetv2b0"
    weights: str = "imagenet"
    # frozen: train the head only; full: everything; warmup: head for train.warmup_epochs, then all.
    trainable: str = "warmup"
    input_size: int = 224
    dense_units: tuple[int, ...] = (1024, 512)
    dropout: float = 0.2
    # None means "on when a GPU is present".
    mixed_precision: bool | None = None
    xla: bool | None = None

    def validate(self) -> None:
        _require(self.name in ("efficientnetv2b0", "small_cnn"), "model.name", self.name,
                 "one of: efficientnetv2b0, small_cnn")
        _require(bool(self.weights), "model.weights", self.weights, "imagenet, none, or a path to a weights file")
        _require(self.trainable in ("frozen", "full", "warmup"), "model.trainable", self.trainable,
                 "one of: frozen, full, warmup")
        _require(32 <= self.input_size <= 1024, "model.input_size", self.input_size, "between 32 and 1024")
        _require(all(units > 0 for units in self.dense_units), "model.dense_units", self.dense_units, "positive sizes")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a fraction in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """How to fit. The global batch is per_replica_batch_size x replicas."""

    run_id: str = ""  # empty: generated at start (timestamp); set it to resume or evaluate a run
    epochs: int = 10
    warmup_epochs: int = 1
    per_replica_batch_size: int = 32
    global_batch_size: int = 0  # 0: derived; if set it must divide evenly by the replicas
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    # The rates above are the rates for a global batch of reference_batch_size (0: the per-replica
    # batch, i.e. one replica); scale_learning_rate multiplies them by global batch / that.
    scale_learning_rate: bool = True
    reference_batch_size: int = 0
    class_weights: bool = True
    augment: bool = True
    shuffle_buffer: int = 2048
    backup_every_n_steps: int = 0  # 0: back up at the end of every epoch only
    # Workers agree whether one got SIGTERM every N steps (and at each epoch's end): an all-reduce
    # and a wait for the step, so not every step. A stop comes within N steps: keep N steps well
    # inside the pod's terminationGracePeriodSeconds.
    preemption_check_every_n_steps: int = setting(20, resume=FREE)
    seed: int = 42
    # Stop after this many whole epochs in this process (tests use it to simulate a crash point).
    max_epochs_this_process: int = setting(0, resume=FREE)

    def validate(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        # 0 as TensorFlow's global seed breaks tf.data's per-epoch seeded shuffles (its seed check
        # then compares a graph tensor to 0), so it is refused here rather than at the first epoch.
        _require(self.seed >= 1, "train.seed", self.seed, ">= 1")
        _require(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs", self.warmup_epochs,
                 f"between 0 and train.epochs ({self.epochs})")
        _require(self.per_replica_batch_size >= 1, "train.per_replica_batch_size", self.per_replica_batch_size, ">= 1")
        _require(self.global_batch_size >= 0, "train.global_batch_size", self.global_batch_size, ">= 0")
        _require(self.reference_batch_size >= 0, "train.reference_batch_size", self.reference_batch_size,
                 ">= 0 (0: train.per_replica_batch_size)")
        _require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _require(self.fine_tune_learning_rate > 0, "train.fine_tune_learning_rate", self.fine_tune_learning_rate, "> 0")
        _require(self.shuffle_buffer >= 1, "train.shuffle_buffer", self.shuffle_buffer, ">= 1")
        _require(self.backup_every_n_steps >= 0, "train.backup_every_n_steps", self.backup_every_n_steps, ">= 0")
        _require(self.preemption_check_every_n_steps >= 1, "train.preemption_check_every_n_steps",
                 self.preemption_check_every_n_steps, ">= 1")
        _require(self.max_epochs_this_process >= 0, "train.max_epochs_this_process",
                 self.max_epochs_this_process, ">= 0")
        if self.run_id:
            # A leading letter or digit keeps '.' and '..' (which would put the run in the data root) out.
            _require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_id) is not None, "train.run_id",
                     self.run_id, "ASCII letters, digits, '-', '_' and '.', starting with a letter or digit")


@dataclass(frozen=True)
class ClusterConfig:
    """The Kubernetes side: how many training workers, which GPUs, where the Jobs run."""

    # The shard count is raised to at least the number of workers (FILE autosharding).
    num_workers: int = setting(1, decides=(SHARDS,))
    gpus_per_worker: int = 1
    # Where a run's pods run and how they find each other, not what they train: a resume may change them.
    gpu_type: str = setting("nvidia-l4", resume=FREE)
    namespace: str = setting("pneumonia", resume=FREE)
    # The Jobs carry the image; the config only records it. A resume after a fix is a new image tag.
    image: str = setting("", resume=RECORDED)
    train_job_name: str = setting("pneumonia-train", resume=FREE)
    train_service_name: str = setting("pneumonia-train-workers", resume=FREE)
    worker_port: int = setting(2222, resume=FREE)
    peer_wait_timeout_s: int = setting(600, resume=FREE)
    # Restarts of one train index the Job forgives (peer lost, preempted) before a lost peer counts
    # (pneumonia.cluster.IndexAttempt.forgives_peer_loss): bounds a partition that never heals.
    max_forgiven_restarts: int = setting(20, resume=FREE)
    # How long a stage waits for its upstream _SUCCESS.json (0: fail at once if it is missing).
    upstream_wait_timeout_s: int = setting(0, resume=FREE)
    # Kueue's LocalQueue in cluster.namespace ("": no Kueue). Set, every Job carries the
    # kueue.x-k8s.io/queue-name label and is created suspended: Kueue starts it once quota (and
    # capacity, for flex-start) for all of its pods is there (docs/gpus-on-gke.md). Where a run
    # queues, not what it trains: a resume may change it.
    queue_name: str = setting("", resume=FREE)

    def validate(self) -> None:
        _require(self.num_workers >= 1, "cluster.num_workers", self.num_workers, ">= 1")
        _require(self.gpus_per_worker >= 0, "cluster.gpus_per_worker", self.gpus_per_worker, ">= 0")
        _require(1 <= self.worker_port <= 65535, "cluster.worker_port", self.worker_port, "a TCP port")
        _require(self.peer_wait_timeout_s >= 0, "cluster.peer_wait_timeout_s", self.peer_wait_timeout_s, ">= 0")
        _require(self.max_forgiven_restarts >= 0, "cluster.max_forgiven_restarts", self.max_forgiven_restarts, ">= 0")
        _require(self.upstream_wait_timeout_s >= 0, "cluster.upstream_wait_timeout_s",
                 self.upstream_wait_timeout_s, ">= 0")
        # A label value that names an object: a DNS subdomain of at most 63 characters.
        _require(self.queue_name == "" or re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?", self.queue_name)
                 is not None, "cluster.queue_name", self.queue_name,
                 "empty (no Kueue) or the name of a Kueue LocalQueue (lower-case letters, digits, '-', '.')")


@dataclass(frozen=True)
class ReportConfig:
    """What the evaluate stage draws besides the numbers."""

    # Test images drawn with their Grad-CAM in gradcam.png (errors first); 0: no figure.
    saliency_images: int = setting(12, resume=FREE)  # evaluate draws it: a training run never depends on it

    def validate(self) -> None:
        _require(0 <= self.saliency_images <= 200, "report.saliency_images", self.saliency_images,
                 "between 0 and 200 (0: no gradcam.png)")


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> PipelineConfig:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if self.train.global_batch_size and self.cluster.num_workers > 1:
            _require(self.train.global_batch_size % self.cluster.num_workers == 0, "train.global_batch_size",
                     self.train.global_batch_size,
                     f"divisible by cluster.num_workers ({self.cluster.num_workers})")
        return self

    def replace(self, **sections: Any) -> PipelineConfig:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def declared_keys(config: PipelineConfig | None = None, *, decides: str | None = None,
                  resume: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The `section.key` names, in declaration order, whose field declares `decides` among the outputs it
    shapes and (if given) one of the `resume` kinds. Walks `config`'s own sections (default: PipelineConfig()),
    so a section subclass with more fields counts them too."""
    config = config if config is not None else PipelineConfig()
    names = []
    for section in dataclasses.fields(config):
        for item in dataclasses.fields(getattr(config, section.name)):
            declared = item.metadata
            if decides is not None and decides not in declared.get("decides", ()):
                continue
            if resume is not None and declared.get("resume", FIXED) not in resume:
                continue
            names.append(f"{section.name}.{item.name}")
    return tuple(names)


def settings_deciding(config: PipelineConfig, output: str) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} (JSON-plain values) of the keys that decide `output` (INTERIM, SHARDS)."""
    tree = config.to_dict()
    chosen: dict[str, dict[str, Any]] = {}
    for name in declared_keys(config, decides=output):
        section, key = name.split(".")
        chosen.setdefault(section, {})[key] = tree[section][key]
    return chosen


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    tree: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}; pass an existing YAML file") from None
        tree = parse_config_yaml(text, str(path))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        section, _, name = key.strip().partition(".")
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        tree[section][name] = raw.strip() if _is_text_field(section, name) else _parse_value(key, raw)
    return from_dict(tree).validate()


def parse_config_yaml(text: str, source: str) -> dict[str, Any]:
    """A config file's text -> its tree of sections (not yet checked against the dataclasses)."""
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {source} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {source} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _is_text_field(section: str, name: str) -> bool:
    """Text fields keep `--set` values verbatim: YAML would read run id 0042 as the octal number 34."""
    section_type = typing.get_type_hints(PipelineConfig).get(section)
    if section_type is None:
        return False
    return typing.get_type_hints(section_type).get(name) is str


def _parse_value(key: str, raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}={raw!r}: the value is not valid YAML") from None


def from_dict(tree: dict[str, Any]) -> PipelineConfig:
    sections = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    built = {}
    for section, values in tree.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(sections)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        built[section] = _build_section(section, typing.get_type_hints(PipelineConfig)[section], values)
    return PipelineConfig(**built)


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{key}; known keys: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Checks a YAML value against a field's type; ints may stand for floats, nothing else converts."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        (item_hint, _) = typing.get_args(hint)
        return tuple(_coerce(key, item_hint, item) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a run id of digits
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key} = {value!r} is invalid: expected {expected}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def new_run_id() -> str:
    """A fresh train.run_id: the UTC start time and 4 random hex digits (runs started in one second differ)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"
