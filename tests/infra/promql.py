"""Small helpers for checking PromQL against the service's metrics: which series names an expression reads,
and which names components/serving/metrics.py exports (prometheus_client's suffixes per metric type)."""

from __future__ import annotations

import ast
import re

# what prometheus_client puts on /metrics for each metric type (the `_created` series included)
SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}

# PromQL words that are not series names (functions are recognised by the "(" that follows them)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
            "bool", "inf", "nan", "atan2"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GRAFANA_VARIABLES = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")


def exported_metric_names(metrics_source: str) -> set[str]:
    """Series names of every prometheus_client metric constructed in a module's source (by its first argument)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(metrics_source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        kind = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        first = node.args[0]
        if kind in SUFFIXES and isinstance(first, ast.Constant) and isinstance(first.value, str):
            base = first.value.removesuffix("_total") if kind == "Counter" else first.value
            names.update(base + suffix for suffix in SUFFIXES[kind])
    return names


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label names, functions, keywords and ranges left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = _GRAFANA_VARIABLES.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if text[match.end():].lstrip().startswith("(") or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names
