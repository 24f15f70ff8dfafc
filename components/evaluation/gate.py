"""Champion / challenger gate: may a newly trained model replace the one in production?

Both reports are `evaluate_predictions` outputs on the SAME golden test images (the champion is
re-evaluated on the current golden split, which only grows). With a champion, the challenger must not be
worse on macro F1, per-class recall or defect detection; without one, it must clear absolute minimums.
Each check is one line of `GateResult.reasons`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

_EPSILON = 1e-9  # so 0.90 >= 0.85 + 0.05 holds despite floating point


class GateRules(BaseModel):
    """The promotion rules (params.yaml `evaluate.gate`)."""

    model_config = ConfigDict(extra="forbid")

    min_macro_f1_gain: float = Field(0.0, description="challenger macro_f1 >= champion macro_f1 + this")
    max_class_recall_drop: float = Field(0.05, description="no class recall may fall by more than this")
    min_defect_detection_rate_delta: float = Field(
        0.0, description="challenger defect_detection_rate >= champion's + this")
    max_latency_ms: float | None = Field(
        None, description="challenger `latency_ms` must not exceed this; None skips the check")
    min_macro_f1: float = Field(0.6, description="without a champion: lowest acceptable macro_f1")
    min_defect_detection_rate: float = Field(0.8, description="without a champion: lowest detection rate")
    max_false_alarm_rate: float = Field(0.2, description="without a champion: highest false alarm rate")


class GateResult(BaseModel):
    """The gate outcome: passed only if every check passed; one reason line per check."""

    passed: bool
    reasons: list[str]
    checks: list[dict[str, Any]]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _check(name: str, value: float | None, op: Literal[">=", "<="], bound: float | None, text: str,
           missing: str) -> dict[str, Any]:
    """One check: `value op bound`, failed when either side is unknown."""
    if value is None or bound is None:
        passed, message = False, f"{text}: FAILED ({missing})"
    else:
        passed = value >= bound - _EPSILON if op == ">=" else value <= bound + _EPSILON
        message = f"{text}: {'ok' if passed else 'FAILED'}"
    return {"name": name, "passed": passed, "status": "ok" if passed else "FAILED", "challenger": value,
            "bound": bound, "message": message}


def _same_test_set(challenger: dict[str, Any], champion: dict[str, Any]) -> dict[str, Any]:
    """Both reports cover the same images (by the digest of their paths, where both have it) of the same classes."""
    same_classes = (challenger.get("classes") == champion.get("classes")
                    and challenger.get("normal_class") == champion.get("normal_class"))
    digests = challenger.get("image_paths_digest"), champion.get("image_paths_digest")
    same_images = digests[0] == digests[1] if all(digests) else True
    same = same_classes and same_images and challenger.get("n_images") == champion.get("n_images")
    text = (f"test set: challenger {challenger.get('n_images')} images, champion {champion.get('n_images')} "
            f"images{'' if same_images else ' (other images)'}, {'same' if same_classes else 'different'} classes")
    message = f"{text}: ok" if same else (f"{text}: FAILED (re-evaluate the champion on the current golden "
                                          "test split before comparing)")
    return {"name": "same_test_set", "passed": same, "status": "ok" if same else "FAILED",
            "challenger": challenger.get("n_images"), "bound": champion.get("n_images"), "message": message}


def _latency_check(challenger: dict[str, Any], rules: GateRules) -> dict[str, Any] | None:
    if rules.max_latency_ms is None:
        return None
    latency = challenger.get("latency_ms")
    return _check("latency_ms", latency, "<=", rules.max_latency_ms,
                  f"latency_ms {_fmt(latency, 1)} <= {rules.max_latency_ms:.1f}",
                  "latency_ms not measured; add it to the challenger report or set max_latency_ms to null")


def _against_champion(challenger: dict[str, Any], champion: dict[str, Any], rules: GateRules) -> list[dict]:
    checks = [_same_test_set(challenger, champion)]
    ours, theirs = challenger.get("macro_f1"), champion.get("macro_f1")
    checks.append(_check(
        "macro_f1", ours, ">=", None if theirs is None else theirs + rules.min_macro_f1_gain,
        f"macro_f1 {_fmt(ours)} >= champion {_fmt(theirs)} + {rules.min_macro_f1_gain:.3f}",
        "macro_f1 undefined"))
    champion_classes = champion.get("per_class", {})
    for name, figures in challenger.get("per_class", {}).items():
        ours, theirs = figures.get("recall"), champion_classes.get(name, {}).get("recall")
        text = f"recall[{name}] {_fmt(ours)} >= champion {_fmt(theirs)} - {rules.max_class_recall_drop:.3f}"
        if ours is None and theirs is None:
            checks.append({"name": f"recall[{name}]", "passed": True, "status": "skipped", "challenger": None,
                           "bound": None, "message": f"{text}: skipped (no test images of {name})"})
            continue
        checks.append(_check(f"recall[{name}]", ours, ">=",
                             None if theirs is None else theirs - rules.max_class_recall_drop, text,
                             f"{name} has test images in one report only"))
    ours, theirs = challenger.get("defect_detection_rate"), champion.get("defect_detection_rate")
    checks.append(_check(
        "defect_detection_rate", ours, ">=",
        None if theirs is None else theirs + rules.min_defect_detection_rate_delta,
        f"defect_detection_rate {_fmt(ours)} >= champion {_fmt(theirs)} + "
        f"{rules.min_defect_detection_rate_delta:.3f}", "no defective test images"))
    return checks


def _absolute(challenger: dict[str, Any], rules: GateRules) -> list[dict]:
    macro_f1 = challenger.get("macro_f1")
    detection = challenger.get("defect_detection_rate")
    false_alarms = challenger.get("false_alarm_rate")
    return [
        _check("macro_f1", macro_f1, ">=", rules.min_macro_f1,
               f"macro_f1 {_fmt(macro_f1)} >= {rules.min_macro_f1:.3f} (no champion)", "macro_f1 undefined"),
        _check("defect_detection_rate", detection, ">=", rules.min_defect_detection_rate,
               f"defect_detection_rate {_fmt(detection)} >= {rules.min_defect_detection_rate:.3f} (no champion)",
               "no defective test images"),
        _check("false_alarm_rate", false_alarms, "<=", rules.max_false_alarm_rate,
               f"false_alarm_rate {_fmt(false_alarms)} <= {rules.max_false_alarm_rate:.3f} (no champion)",
               "no normal test images"),
    ]


def compare(challenger: dict[str, Any], champion: dict[str, Any] | None, rules: GateRules) -> GateResult:
    """Run the gate: against the champion's figures when there is one, else against absolute minimums."""
    checks = _absolute(challenger, rules) if champion is None else _against_champion(challenger, champion, rules)
    latency = _latency_check(challenger, rules)
    if latency is not None:
        checks.append(latency)
    passed = all(check["passed"] for check in checks)
    for check in checks:
        log.log(logging.INFO if check["passed"] else logging.WARNING, "gate: %s", check["message"])
    log.info("gate %s (%s)", "passed" if passed else "FAILED", "vs champion" if champion else "no champion")
    return GateResult(passed=passed, reasons=[check["message"] for check in checks], checks=checks)


_ROWS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro F1"),
    ("defect_detection_rate", "defect detection rate"),
    ("false_alarm_rate", "false alarm rate"),
    ("escape_rate", "escape rate"),
    ("review_rate", "review rate"),
    ("auto_precision", "auto precision"),
    ("ece", "ECE (calibration)"),
)


def _cell(report: dict[str, Any] | None, key: str) -> str:
    """A figure with its interval, e.g. `0.912 [0.880, 0.940]`."""
    if report is None:
        return "—"
    text = _fmt(report.get(key))
    interval = (report.get("intervals") or {}).get(key)
    if isinstance(interval, dict):
        text += f" [{interval['low']:.3f}, {interval['high']:.3f}]"
    return text


def _change(challenger: dict[str, Any], champion: dict[str, Any] | None, key: str) -> str:
    ours = challenger.get(key)
    theirs = None if champion is None else champion.get(key)
    return "—" if ours is None or theirs is None else f"{ours - theirs:+.3f}"


def _resampled(report: dict[str, Any]) -> str:
    """What the bootstrap resampled: whole capture groups, or images (also when every group is one image)."""
    boot = report.get("bootstrap") or {}
    if boot.get("unit") == "group" and boot.get("n_units") not in (None, report.get("n_images")):
        return f"resampling whole capture groups within each class ({boot['n_units']} groups)."
    return "resampling images" + (" (every capture group is one image)." if boot.get("unit") == "group" else ".")


def _review_rule_lines(report: dict[str, Any], version: str) -> list[str]:
    """A warning line when the challenger's review threshold missed its validation target, or was never tuned:
    its escapes and review rate are then not what the plant asked for, whatever the gate says."""
    rule = report.get("review_rule", "absent")
    if rule == "absent":  # a report from before review_rule was recorded
        return []
    if rule is None:
        return [(f"**Warning:** {version} has no stored calibration: temperature 1 and threshold 0.5, not tuned on "
                "validation.")]
    if rule.get("target_met") is False:
        return [(f"**Warning:** {version}'s review threshold missed its validation target (auto precision "
                f"{_fmt(rule.get('target_auto_precision'))} within review rate {_fmt(rule.get('max_review_rate'))}): "
                f"{rule.get('reason') or 'no reason recorded'}.")]
    return []


def comparison_markdown(challenger: dict[str, Any], champion: dict[str, Any] | None, gate_result: GateResult,
                        challenger_version: str, champion_version: str | None = None) -> str:
    """A markdown report: key figures side by side with 95% intervals, recall per class, the gate outcome."""
    champion_name = f"champion {champion_version}" if champion is not None else "champion (none)"
    lines = [
        f"# Challenger {challenger_version} vs {champion_name}",
        "",
        f"Golden test set: {challenger.get('n_images')} images; decision threshold "
        f"{_fmt(challenger.get('threshold'))} (challenger)"
        + (f", {_fmt(champion.get('threshold'))} (champion)." if champion is not None else "."),
        "Intervals are 95% bootstrap intervals " + _resampled(challenger),
        *_review_rule_lines(challenger, challenger_version),
        "",
        f"| figure | challenger {challenger_version} | {champion_name} | change |",
        "|---|---|---|---|",
    ]
    for key, label in _ROWS:
        lines.append(f"| {label} | {_cell(challenger, key)} | {_cell(champion, key)} | "
                     f"{_change(challenger, champion, key)} |")
    if "latency_ms" in challenger or (champion is not None and "latency_ms" in champion):
        ours = challenger.get("latency_ms")
        theirs = None if champion is None else champion.get("latency_ms")
        lines.append(f"| latency (ms) | {_fmt(ours, 1)} | {'—' if champion is None else _fmt(theirs, 1)} | "
                     f"{'—' if ours is None or theirs is None else f'{ours - theirs:+.1f}'} |")
    lines += ["", "## Recall per class", "", f"| class | support | challenger | {champion_name} | change |",
              "|---|---|---|---|---|"]
    champion_classes = (champion or {}).get("per_class", {})
    for name, figures in challenger.get("per_class", {}).items():
        ours, theirs = figures.get("recall"), champion_classes.get(name, {}).get("recall")
        change = "—" if ours is None or theirs is None else f"{ours - theirs:+.3f}"
        lines.append(f"| {name} | {figures.get('support')} | {_fmt(ours)} | "
                     f"{'—' if champion is None else _fmt(theirs)} | {change} |")
    outcome = "PASSED" if gate_result.passed else "FAILED"
    lines += ["", f"## Gate: {outcome}", ""]
    lines += [f"- {reason}" for reason in gate_result.reasons]
    return "\n".join(lines) + "\n"
