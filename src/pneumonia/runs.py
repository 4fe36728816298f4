"""Runs side by side: one line per run under ROOT/runs/, then the config keys the runs differ in.

    python -m pneumonia.runs --root data/demo            # or gs://bucket/prefix
    python -m pneumonia.runs --root data/demo --run a --run b

Status: finished (the run's _SUCCESS.json), stopped or failed (its _ENDED.json, written when a run
stops on purpose or fails for good), else running (or killed before it could say: a pod that is
gone leaves no marker). Metrics are the test-set report's, with their patient-bootstrap 95 % CIs;
a run not evaluated yet shows "-", an undefined value "n/a". For curves and the HParams table:
`tensorboard --logdir ROOT/runs`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pneumonia import storage
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_OK, BadInputError
from pneumonia.evaluation.report import history_epochs, with_ci
from pneumonia.hparams import flatten
from pneumonia.layout import Layout

HEADLINE = (("accuracy", "accuracy"), ("kappa", "cohen_kappa"), ("macro F1", "macro_f1"), ("AUC", "auc_macro"))
BINARY = (("sensitivity", "sensitivity"), ("specificity", "specificity"))
# Differs between every pair of runs by definition: not worth a line.
_ALWAYS_DIFFERENT = ("train.run_id",)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: str
    reason: str = ""
    model: str = "?"
    epochs: str = "?"
    metrics: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # flattened section.key -> value


def run_status(layout: Layout, run_id: str) -> tuple[str, str]:
    """(finished | stopped | failed | running, the reason an ended run gave)."""
    if storage.exists(layout.run_marker(run_id)):
        return "finished", ""
    ended = _read_json_or_none(layout.run_ended(run_id))
    if isinstance(ended, Mapping) and ended.get("status") in ("stopped", "failed"):
        return str(ended["status"]), str(ended.get("reason", ""))
    return "running", ""


def summarize(layout: Layout, run_id: str) -> RunSummary:
    """What one run's files say: status, model, epochs done / planned, the report's headline with CIs."""
    status, reason = run_status(layout, run_id)
    config_path = layout.run_config(run_id)
    config = flatten(yaml.safe_load(storage.read_text(config_path)) or {}) if storage.exists(config_path) else {}
    history = _read_json_or_none(layout.history(run_id))
    planned = config.get("train.epochs", "?")
    epochs = f"{len(history_epochs(history))}/{planned}"
    metrics = _read_json_or_none(storage.join(layout.report(run_id), "metrics.json"))
    return RunSummary(run_id, status, reason, str(config.get("model.name", "?")), epochs,
                      headline(metrics) if isinstance(metrics, Mapping) else {}, config)


def headline(metrics: Mapping[str, Any]) -> dict[str, str]:
    """'0.912 [0.889, 0.934]' per headline metric (and the pneumonia-vs-normal pair) from metrics.json."""
    ci95 = metrics.get("ci95") or {}
    binary = metrics.get("binary") or {}
    found = {label: with_ci(metrics.get(key), ci95.get(key)) for label, key in HEADLINE}
    found.update({label: with_ci(binary.get(key), (binary.get("ci95") or {}).get(key)) for label, key in BINARY})
    ece = (metrics.get("calibration") or {}).get("ece", {}).get("after")
    found["ECE"] = with_ci(ece, None)
    return found


def differing_keys(runs: Sequence[RunSummary]) -> dict[str, dict[str, Any]]:
    """section.key -> {run_id: value} for the config keys whose values are not the same in every run."""
    configured = [run for run in runs if run.config]
    keys = sorted({key for run in configured for key in run.config} - set(_ALWAYS_DIFFERENT))
    differing = {}
    for key in keys:
        values = {run.run_id: run.config.get(key, "(absent)") for run in configured}
        if len({repr(value) for value in values.values()}) > 1:
            differing[key] = values
    return differing


def render(runs: Sequence[RunSummary]) -> str:
    """The table of runs, then the keys that differ between them."""
    columns = ["run", "status", "model", "epochs", *(label for label, _ in HEADLINE),
               *(label for label, _ in BINARY), "ECE"]
    rows = [[run.run_id, run.status, run.model, run.epochs, *(run.metrics.get(c, "-") for c in columns[4:])]
            for run in runs]
    lines = _aligned([columns, *rows])
    ended = [f"  {run.run_id}: {run.status}: {run.reason}" for run in runs if run.reason]
    if ended:
        lines += ["", "why runs ended:", *ended]
    differing = differing_keys(runs)
    if len([run for run in runs if run.config]) > 1:
        lines += ["", "config keys that differ:" if differing else "config keys that differ: none"]
        lines += _aligned([[f"  {key}", *(f"{run_id}={_value(value)}" for run_id, value in values.items())]
                           for key, values in differing.items()])
    return "\n".join(lines)


def list_runs(root: str, only: Sequence[str] = ()) -> list[RunSummary]:
    """Every run under root/runs/ (or the named ones), sorted by run id (ids start with their UTC time)."""
    layout = Layout(root.rstrip("/"))
    runs_dir = storage.join(layout.root, "runs")
    found = storage.listdir(runs_dir)
    if not found:
        raise BadInputError(f"no runs under {runs_dir}: pass the data root the stages wrote to (data.root), "
                            "e.g. --root data/demo or --root gs://bucket/prefix")
    missing = sorted(set(only) - set(found))
    if missing:
        raise BadInputError(f"no run {', '.join(missing)} under {runs_dir} (runs there: {', '.join(found)})")
    return [summarize(layout, run_id) for run_id in found if not only or run_id in only]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumonia.runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the data root (data.root): a local folder or gs://bucket/prefix")
    parser.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN_ID",
                        help="list only this run; repeatable")
    args = parser.parse_args(argv)
    try:
        print(render(list_runs(args.root, args.runs)), flush=True)
    except BadInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _read_json_or_none(path: str) -> Any:
    # A file being rewritten, or never written, costs a "-" in the table, not the listing.
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except (ValueError, UnicodeDecodeError):
        return None


def _value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


if __name__ == "__main__":
    sys.exit(main())
