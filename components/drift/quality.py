"""The plant quality report over a production-log window: defects, review rate, confidence, throughput, latency.

Markdown (quality.md) with PNG charts (matplotlib, Agg backend) next to the drift report, plus the headline
figures as a dict for summary.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.drift.window import Window
from components.files import write_text_atomic

log = logging.getLogger(__name__)

QUALITY_FILE = "quality.md"


@dataclass
class QualityReport:
    """Where the quality report went and its headline figures."""

    markdown: Path
    charts: list[Path] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def _round(value: Any, digits: int = 4) -> Any:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else round(float(value), digits)


def _local(frame: pd.DataFrame, timezone: str) -> pd.Series:
    """The records' timestamps in the plant's timezone, whose calendar days the per-day figures follow."""
    return frame["timestamp"].dt.tz_convert(timezone)


def daily_table(frame: pd.DataFrame, normal_class: str | None, timezone: str = "UTC") -> pd.DataFrame:
    """Per plant day: predictions, defects, review rate, confidence mean and p10, latency p50 and p99."""
    day = _local(frame, timezone).dt.strftime("%Y-%m-%d")
    defect = frame["predicted_class"].ne(normal_class) if normal_class else pd.Series(np.nan, index=frame.index)
    grouped = frame.assign(day=day, defect=defect, review=frame["decision"].eq("review")).groupby("day")
    table = pd.DataFrame({
        "predictions": grouped.size(),
        "defects": grouped["defect"].sum(min_count=1),
        "review_rate": grouped["review"].mean(),
        "confidence_mean": grouped["confidence"].mean(),
        "confidence_p10": grouped["confidence"].quantile(0.10),
        "latency_p50_ms": grouped["latency_ms"].quantile(0.50),
        "latency_p99_ms": grouped["latency_ms"].quantile(0.99),
    })
    table.index.name = "day"
    return table


def quality_figures(frame: pd.DataFrame, normal_class: str | None, timezone: str = "UTC") -> dict[str, Any]:
    """Headline figures of a window: throughput, review and defect rates, confidence, latency p50/p99."""
    if frame.empty:
        return {"n_predictions": 0}
    local = _local(frame, timezone).dt.tz_localize(None)  # wall-clock time: a DST day is still one day
    hours = local.dt.floor("h").value_counts()
    days = local.dt.floor("D").value_counts()
    defects = frame[frame["predicted_class"] != normal_class] if normal_class else frame.iloc[0:0]
    return {
        "n_predictions": len(frame), "active_days": len(days), "active_hours": len(hours),
        "predictions_per_active_day": _round(days.mean(), 1), "predictions_per_active_hour": _round(hours.mean(), 1),
        "peak_predictions_per_hour": int(hours.max()),
        "defect_rate": _round(len(defects) / len(frame)) if normal_class else None,
        "defects_by_type": {str(k): int(v) for k, v in defects["predicted_class"].value_counts().items()},
        "decisions": {str(k): int(v) for k, v in frame["decision"].value_counts().items()},
        "review_rate": _round(frame["decision"].eq("review").mean()),
        "confidence_mean": _round(frame["confidence"].mean()),
        "latency_p50_ms": _round(frame["latency_ms"].quantile(0.50), 2),
        "latency_p99_ms": _round(frame["latency_ms"].quantile(0.99), 2),
    }


def _charts(frame: pd.DataFrame, table: pd.DataFrame, normal_class: str | None, out_dir: Path,
            timezone: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        paths.append(out_dir / name)

    days = pd.to_datetime(table.index)
    frame = frame.assign(local=_local(frame, timezone).dt.tz_localize(None))
    defects = frame[frame["predicted_class"] != normal_class] if normal_class else frame
    by_type = pd.crosstab(defects["local"].dt.floor("D"), defects["predicted_class"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = np.zeros(len(by_type))
    for name in by_type.columns:
        ax.bar(by_type.index, by_type[name].to_numpy(), bottom=bottom, label=str(name), width=0.8)
        bottom += by_type[name].to_numpy()
    ax.set(title="Defects by type per day" + ("" if normal_class else " (all classes)"), ylabel="parts")
    if len(by_type.columns):
        ax.legend(fontsize=7, ncol=3)
    save(fig, "defects_by_type.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(days, table["review_rate"], marker="o")
    ax.set(title="Review rate per day", ylabel="share sent to review", ylim=(0, max(0.05, table["review_rate"].max()
                                                                                   * 1.2)))
    save(fig, "review_rate.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(days, table["confidence_mean"], marker="o", label="mean")
    ax.plot(days, table["confidence_p10"], marker=".", linestyle="--", label="10th percentile")
    ax.set(title="Confidence per day", ylabel="top-1 probability", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    save(fig, "confidence.png")

    per_hour = frame.set_index("local").sort_index().resample("h").size()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(per_hour.index, per_hour.to_numpy(), linewidth=1)
    ax.set(title="Throughput: predictions per hour", ylabel="predictions")
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(days, table["latency_p50_ms"], marker="o", label="p50")
    ax.plot(days, table["latency_p99_ms"], marker="o", label="p99")
    ax.set(title="Latency per day", ylabel="ms")
    ax.legend(fontsize=8)
    save(fig, "latency.png")
    return paths


def _markdown_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join([table.index.name or "", *map(str, table.columns)]) + " |"
    rule = "|" + "---|" * (len(table.columns) + 1)
    rows = []
    for index, row in table.iterrows():
        cells = ["-" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else
                 str(int(v)) if isinstance(v, float) else str(v) for v in row]
        rows.append("| " + " | ".join([str(index), *cells]) + " |")
    return "\n".join([header, rule, *rows])


def _models(frame: pd.DataFrame, model_version: str | None) -> str:
    """'Model: X' when every record is X's, else each version with its count: the figures cover them all."""
    counts = frame["model_version"].fillna("unknown").value_counts() if "model_version" in frame else pd.Series()
    if len(counts) <= 1:
        return f"Model: {counts.index[0] if len(counts) else model_version or 'any'}"
    listed = ", ".join(f"{name} ({count})" for name, count in counts.items())
    return f"Models (the figures cover all): {listed}"


def quality_report(frame: pd.DataFrame, window: Window, out_dir: Path, normal_class: str | None,
                   model_version: str | None = None) -> QualityReport:
    """Write quality.md and its PNG charts for the production records of a window (days: the window's
    timezone, the plant's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    zone = window.timezone
    figures = quality_figures(frame, normal_class, zone)
    lines = [f"# Plant quality report, {window.label} (UTC)", ""]
    path = out_dir / QUALITY_FILE
    if frame.empty:
        lines += ["No predictions in this window."]
        write_text_atomic(path, "\n".join(lines) + "\n")
        return QualityReport(path, [], figures)
    table = daily_table(frame, normal_class, zone)
    charts = _charts(frame, table, normal_class, out_dir, zone)
    lines += [
        f"{_models(frame, model_version)}; normal class: {normal_class or 'unknown'}; days in {zone}.", "",
        "| figure | value |", "|---|---|",
        f"| predictions | {figures['n_predictions']} over {figures['active_days']} active days |",
        (f"| throughput | {figures['predictions_per_active_day']} per active day, "
         f"{figures['predictions_per_active_hour']} per active hour (peak {figures['peak_predictions_per_hour']}) |"),
        f"| defect rate | {figures['defect_rate']} |",
        f"| review rate | {figures['review_rate']} |",
        f"| mean confidence | {figures['confidence_mean']} |",
        f"| latency p50 / p99 | {figures['latency_p50_ms']} / {figures['latency_p99_ms']} ms |",
        "", "Defects by type: " + (", ".join(f"{k} {v}" for k, v in figures["defects_by_type"].items()) or "none"),
        "", f"## Per day ({zone})", "", _markdown_table(table), "", "## Charts", "",
        *[f"![{p.stem.replace('_', ' ')}]({p.name})" for p in charts],
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")
    log.info("quality report %s (%d charts)", path, len(charts))
    return QualityReport(path, charts, figures)
