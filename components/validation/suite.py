"""The data tests: a Great Expectations suite over the image manifest, with failures that name the files.

Two suites run on every call, both defined here in code (GX 1.x API):
- `manifest` over the manifest itself (one row per image): the label set, unknown classes, unreadable files,
  width/height/mode, duplicate contents, class proportions against the previous version, and the
  brightness/contrast/sharpness ranges;
- `class_counts` over a small table of readable images per expected class (GX has no per-value count
  expectation), so a class with too few images, or none, fails with its name.

Unreadable rows have no width, height, mode or statistics (nulls), which GX's column-map expectations leave
out, so only the `readable` expectation names them. The GX context is ephemeral (in memory) and cached for the
process; each call rebuilds the suites from the params and really runs them. With a report folder, the full
result goes to `validation.json` and the GX Data Docs to `data_docs/index.html`; nothing else is written.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import DatasetProfile, Range, ValidateParams
from components.data.split import SPLITS
from components.errors import UsageError
from components.files import write_text_atomic

log = logging.getLogger(__name__)

MAX_NAMED = 10  # offending files named per failure line, then "and N more"
REPORT_FILE = "validation.json"
DOCS_DIR = "data_docs"
REQUIRED_COLUMNS = ["path", "label", "split", "sha256", "readable", "error", "width", "height", "mode",
                    "brightness", "contrast", "sharpness"]
STAT_COLUMNS = ("brightness", "contrast", "sharpness")
NEW = "new"  # an import's manifest: True for the images it adds (their brightness, contrast, sharpness judged alone)
# failure lines come in this order: what the dataset holds, then file problems, then statistics
CHECK_ORDER = ("label_set", "label_known", "class_size", "split_missing", "split", "group_split", "readable", "unique",
               "width", "height", "mode", "class_shift", *STAT_COLUMNS)
GROUP_SPLITS = "group_splits"  # derived: how many splits the image's capture group is in (1, or a leak)
_DUPLICATE_KINDS = ("label conflict", "split leak", "duplicate")
_SITE = "defectops_report"
_MANIFEST, _COUNTS = "manifest", "class_counts"


@dataclass
class ValidationReport:
    """Outcome of validating one manifest: pass/fail, counts, one line per failed expectation, the full result."""

    success: bool
    statistics: dict
    failures: list[str]
    result: dict
    report_dir: Path | None = None

    def summary(self) -> str:
        """Readable multi-line summary for the CLI."""
        stats = self.statistics
        verdict = "passed" if self.success else "FAILED"
        head = (f"Dataset validation {verdict}: {stats['successful_expectations']} of "
                f"{stats['evaluated_expectations']} expectations met over {self.result.get('images', '?')} images")
        lines = [head + ("" if self.success else f", {stats['unsuccessful_expectations']} failed") + "."]
        lines += [f"  - {failure}" for failure in self.failures]
        if self.report_dir is not None:
            lines.append(f"Report: {self.report_dir / REPORT_FILE}; "
                         f"Data Docs: {self.report_dir / DOCS_DIR / 'index.html'}")
        return "\n".join(lines)


def class_shares(manifest: pd.DataFrame) -> dict[str, float]:
    """Share of each label among the manifest's images (pass it as `previous_shares` for the next version)."""
    if manifest.empty:
        return {}
    shares = manifest["label"].astype(str).value_counts(normalize=True).sort_index()
    return {str(label): float(share) for label, share in shares.items()}


# ---------------------------------------------------------------- the GX context, cached per process


@dataclass
class _Gx:
    context: Any
    batches: dict[str, Any]


_GX: _Gx | None = None
_LOCK = threading.Lock()


def _gx() -> _Gx:
    """The process's ephemeral GX context with the two DataFrame assets (created once)."""
    global _GX
    if _GX is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        )
        context = gx.get_context(mode="ephemeral", project_config=config)
        source = context.data_sources.add_pandas(name="defectops")
        batches = {name: source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
                   for name in (_MANIFEST, _COUNTS)}
        _GX = _Gx(context=context, batches=batches)
    return _GX


# ---------------------------------------------------------------- the suites


def _between(check: str, column: str, bounds: Range, description: str, row_condition: Any = None) -> Any | None:
    """A range expectation on a column (on the rows `row_condition` keeps), or None when the range is open on
    both sides."""
    import great_expectations.expectations as gxe

    if bounds.min is None and bounds.max is None:
        return None
    return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=bounds.min, max_value=bounds.max,
                                             mostly=bounds.mostly, meta={"check": check},
                                             description=description, row_condition=row_condition)


def _manifest_expectations(profile: DatasetProfile, rules: ValidateParams,
                           previous_shares: dict[str, float] | None, judge_new: bool = False) -> list[Any]:
    """The expectations over the manifest rows."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    classes = list(profile.classes)
    expectations = [
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=classes, meta={"check": "label_set"},
            description="Every class of the profile has images"),
        gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=classes, meta={"check": "label_known"},
            description="Every image is in one of the profile's classes"),
        gxe.ExpectColumnValuesToNotBeNull(
            column="split", meta={"check": "split_missing"},
            description="Every image has a split (splits.csv)"),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), meta={"check": "split"},
            description="Every split is train, val or test"),
        gxe.ExpectColumnValuesToBeInSet(
            column=GROUP_SPLITS, value_set=[1], meta={"check": "group_split"},
            description="A capture group (one spot's exposures) is in one split: never trained on and scored"),
        gxe.ExpectColumnValuesToBeInSet(
            column="readable", value_set=[True], meta={"check": "readable"},
            description="Every file is a non-empty image that decodes completely"),
        _between("width", "width", rules.width, "Image width within validate.width"),
        _between("height", "height", rules.height, "Image height within validate.height"),
        gxe.ExpectColumnValuesToBeInSet(
            column="mode", value_set=list(rules.modes), meta={"check": "mode"},
            description="Pillow mode is one of validate.modes"),
        gxe.ExpectColumnValuesToBeUnique(
            column="sha256", row_condition=Column("readable") == True,  # a GX row condition, not a comparison
            meta={"check": "unique"},
            description="No image content appears twice (label conflicts, split leaks, duplicates)"),
    ]
    if previous_shares:
        values, weights = _partition(previous_shares)
        expectations.append(gxe.ExpectColumnKLDivergenceToBeLessThan(
            column="label", partition_object={"values": values, "weights": weights},
            threshold=rules.max_class_shift_kl, row_condition=Column("label").is_in(classes),
            meta={"check": "class_shift"},
            description="Class proportions close to the previous version (validate.max_class_shift_kl)"))
    # an import's own pictures are held to `mostly` among themselves: over old and new rows together, a batch of
    # up to 1% of the dataset could be out of range entirely (a dead lamp's month) and pass
    new_only = Column(NEW) == True if judge_new else None  # a GX row condition, not a comparison
    for column in STAT_COLUMNS:
        expectations.append(_between(column, column, getattr(rules, column), f"Image {column} within "
                                     f"validate.{column}" + (" (the new images)" if judge_new else ""), new_only))
    return [e for e in expectations if e is not None]


def _partition(previous_shares: dict[str, float]) -> tuple[list[str], list[float]]:
    """Previous class shares as a GX categorical partition (weights summing to one)."""
    total = sum(previous_shares.values())
    if total <= 0 or any(share < 0 or math.isnan(share) for share in previous_shares.values()):
        raise UsageError(f"previous class shares {previous_shares}: need non-negative shares with a positive "
                         "sum; pass class_shares() of the previous version's manifest")
    values = sorted(previous_shares)
    return values, [previous_shares[v] / total for v in values]


def _count_expectations(rules: ValidateParams) -> list[Any]:
    """The expectations over the per-class image counts."""
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeBetween(
        column="images", min_value=rules.min_images_per_class, meta={"check": "class_size"},
        description="Every class has at least validate.min_images_per_class readable images")]


def _class_counts(manifest: pd.DataFrame, profile: DatasetProfile) -> pd.DataFrame:
    """Readable images per expected class, zero for a class with none."""
    readable = manifest.loc[manifest["readable"].astype(bool), "label"].astype(str)
    counts = readable.value_counts().reindex(profile.classes, fill_value=0)
    return pd.DataFrame({"label": list(profile.classes), "images": counts.to_numpy(dtype="int64")})


# ---------------------------------------------------------------- failure lines


def _listing(items: list[str]) -> str:
    """Up to MAX_NAMED items joined, then "and N more"."""
    shown = " | ".join(items[:MAX_NAMED])
    return shown + (f" | and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _unexpected_paths(result: dict) -> list[str]:
    return [str(row["path"]) for row in result.get("unexpected_index_list") or [] if "path" in row]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _outside(bounds: Range) -> str:
    if bounds.min is not None and bounds.max is not None:
        return f"outside [{_fmt(bounds.min)}, {_fmt(bounds.max)}]"
    return f"below {_fmt(bounds.min)}" if bounds.min is not None else f"above {_fmt(bounds.max)}"


class _Lines:
    """Turns each failed expectation into one line that names the offending files and the fix."""

    def __init__(self, manifest: pd.DataFrame, profile: DatasetProfile, rules: ValidateParams,
                 previous_shares: dict[str, float] | None) -> None:
        self.manifest, self.profile, self.rules = manifest, profile, rules
        self.previous_shares = previous_shares or {}
        self._rows: pd.DataFrame | None = None

    @property
    def rows(self) -> pd.DataFrame:
        """The manifest indexed by path (built only when a failure needs it)."""
        if self._rows is None:
            self._rows = self.manifest.drop_duplicates("path").set_index("path", drop=False)
        return self._rows

    def line(self, check: str, result: dict) -> str:
        """The failure line of one failed expectation."""
        handler: Callable[[dict], str] | None = getattr(self, f"_{check}", None)
        if handler is None and check in ("width", "height", *STAT_COLUMNS):
            return self._range(check, result)
        return handler(result) if handler else f"{check}: failed ({json.dumps(result, default=str)[:300]})"

    def _label_set(self, result: dict) -> str:
        present = set(self.manifest["label"].astype(str))
        missing = [c for c in self.profile.classes if c not in present]
        return (f"no images of {missing}, classes of the dataset profile {self.profile.classes}; add a folder "
                "of images per class or remove the class from the dataset's classes in params.yaml")

    def _label_known(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        unknown = sorted(set(self.rows.loc[paths, "label"].astype(str)))
        return (f"{_plural(len(paths), 'file')} in classes not in the profile {unknown}: {_listing(paths)}; "
                "move them into a known class folder or add the class to the dataset's classes in params.yaml")

    def _split_missing(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        return (f"{_plural(len(paths), 'file')} without a split: {_listing(paths)}; give each train, val or test in "
                "splits.csv and build the manifest again (`defectops data manifest`)")

    def _tagged(self, paths: list[str], column: str) -> list[str]:
        """Each path with its value of `column`: "a.png (tset)"."""
        return [f"{p} ({v})" for p, v in zip(paths, self.rows.loc[paths, column], strict=True)]

    def _split(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        return (f"{_plural(len(paths), 'file')} with a split not in {list(SPLITS)}: "
                f"{_listing(self._tagged(paths, 'split'))}; correct them in splits.csv and commit it")

    def _group_split(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        rows = self.rows.loc[paths]
        groups = rows["group"] if "group" in rows.columns else rows["path"]
        items = [f"{p} ({g}: {s})" for p, g, s in zip(paths, groups, rows["split"], strict=True)]
        return (f"{_plural(len(paths), 'file')} in capture groups that span two splits, so one spot would be trained "
                f"on and scored: {_listing(items)}; leave out new images that join two groups, or move the group's "
                "images into one split in splits.csv")

    def _readable(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        errors = self.rows.loc[paths, "error"].fillna("").astype(str)
        items = [f"{p}: {e or 'unreadable'}" for p, e in zip(paths, errors, strict=True)]
        return f"{_plural(len(paths), 'unreadable file')} (empty, truncated or not an image): {_listing(items)}"

    def _range(self, check: str, result: dict) -> str:
        bounds: Range = getattr(self.rules, check)
        paths = _unexpected_paths(result)
        values = self.rows.loc[paths, check]
        items = [f"{p} ({_fmt(float(v))})" for p, v in zip(paths, values, strict=True)]
        counted = result.get("element_count", 0) - result.get("missing_count", 0)
        allowed = (f" (at most {math.floor(counted * (1 - bounds.mostly) + 1e-9)} allowed by mostly="
                   f"{bounds.mostly:g})" if bounds.mostly < 1 else "")
        return (f"{check} {_outside(bounds)} in {len(paths)} of {counted} readable images"
                f"{allowed}: {_listing(items)}; fix or remove these "
                f"images, or widen validate.{check} in params.yaml if they are valid")

    def _mode(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        return (f"{_plural(len(paths), 'image')} in a mode not in validate.modes: "
                f"{_listing(self._tagged(paths, 'mode'))}; convert them or add the mode to validate.modes in "
                "params.yaml")

    def _unique(self, result: dict) -> str:
        paths = _unexpected_paths(result)
        rows = self.rows.loc[paths]
        groups = []
        for _, group in rows.groupby("sha256", sort=False):
            labels = set(group["label"].astype(str))
            splits = set(group["split"].dropna().astype(str))
            if len(labels) > 1:
                kind, names = "label conflict", [f"{p} ({lab})" for p, lab in zip(group["path"], group["label"],
                                                                                   strict=True)]
            elif len(splits) > 1:
                kind, names = "split leak", [f"{p} ({s})" for p, s in zip(group["path"], group["split"],
                                                                          strict=True)]
            else:
                kind, names = "duplicate", list(group["path"])
            groups.append((_DUPLICATE_KINDS.index(kind), f"{kind}: {' = '.join(names)}"))
        items = [text for _, text in sorted(groups, key=lambda g: g[0])]
        return (f"{len(paths)} files share their content (sha256) with another: {_listing(items)}; keep one copy "
                "of each (for a label conflict, the one in the right class)")

    def _class_size(self, result: dict) -> str:
        items = [f"{row['label']} {int(row['images'])}" for row in result.get("unexpected_index_list") or []]
        return (f"classes with fewer than {self.rules.min_images_per_class} readable images "
                f"(validate.min_images_per_class): {_listing(items)}; add images to them or lower the minimum")

    def _class_shift(self, result: dict) -> str:
        partition = (result.get("details") or {}).get("observed_partition") or {}
        observed = {str(c): 0.0 if math.isnan(w) else float(w)
                    for c, w in zip(partition.get("values", []), partition.get("weights", []), strict=True)}
        kl = result.get("observed_value")
        new = [c for c, share in observed.items() if share > 0 and not self.previous_shares.get(c)]
        if kl is not None:
            what = f"{kl:.3g}"
        elif new:
            what = f"infinite ({new} had no images before)"
        else:
            what = "undefined (no images of the profile's classes to compare)"
        total = sum(self.previous_shares.values()) or 1.0
        change = {c: (observed.get(c, 0.0), self.previous_shares.get(c, 0.0) / total)
                  for c in sorted(set(observed) | set(self.previous_shares))}
        items = [f"{c} {100 * now:.1f}% (was {100 * was:.1f}%)"
                 for c, (now, was) in sorted(change.items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))]
        return (f"class proportions moved from the previous version: KL divergence {what} > "
                f"{self.rules.max_class_shift_kl:g} (validate.max_class_shift_kl): {_listing(items)}; check the "
                "new images' labels, or raise validate.max_class_shift_kl if the shift is real")


# ---------------------------------------------------------------- running


def _check_columns(manifest: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise UsageError(f"manifest lacks the columns {missing}; build it with "
                         "components.validation.manifest.build_manifest")


def _clear_results(context: Any) -> None:
    """Forget earlier calls' validation results, so the Data Docs show this call only."""
    store = context.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


def _run_suite(gxc: _Gx, name: str, expectations: list[Any], frame: pd.DataFrame, index_column: str) -> Any:
    import great_expectations as gx

    context = gxc.context
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=gxc.batches[name], suite=suite))
    return definition.run(batch_parameters={"dataframe": frame},
                          result_format={"result_format": "COMPLETE",
                                         "unexpected_index_column_names": [index_column]})


def _failure_lines(results: list[Any], lines: _Lines) -> list[str]:
    """One line per failed expectation of the suite results, in CHECK_ORDER."""
    failed = []
    for validation in results:
        for outcome in validation.results:
            if outcome.success:
                continue
            check = (outcome.expectation_config.meta or {}).get("check", outcome.expectation_config.type)
            info = outcome.exception_info or {}
            if info.get("raised_exception"):
                line = f"{check}: the expectation could not run ({info.get('exception_message')})"
            else:
                line = lines.line(check, outcome.result)
            failed.append((CHECK_ORDER.index(check) if check in CHECK_ORDER else len(CHECK_ORDER), line))
    return [line for _, line in sorted(failed, key=lambda f: f[0])]


def _build_docs(context: Any, docs_dir: Path) -> None:
    site = {"class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}
    if _SITE in (context.config.data_docs_sites or {}):
        context.update_data_docs_site(_SITE, site)
    else:
        context.add_data_docs_site(_SITE, site)
    context.build_data_docs(site_names=[_SITE])


def validate_manifest(manifest: pd.DataFrame, profile: DatasetProfile, rules: ValidateParams,
                      previous_shares: dict[str, float] | None = None,
                      report_dir: Path | None = None) -> ValidationReport:
    """Run the data tests on a manifest; with `report_dir`, write validation.json and data_docs/ there."""
    _check_columns(manifest)
    started = time.perf_counter()
    manifest = manifest.reset_index(drop=True)
    groups = manifest["group"] if "group" in manifest.columns else manifest["path"]
    manifest[GROUP_SPLITS] = manifest.groupby(groups, dropna=False)["split"].transform("nunique").clip(lower=1)
    counts = _class_counts(manifest, profile)
    with _LOCK:
        gxc = _gx()
        _clear_results(gxc.context)
        results = [
            _run_suite(gxc, _MANIFEST, _manifest_expectations(profile, rules, previous_shares,
                                                              judge_new=bool(NEW in manifest and manifest[NEW].any())),
                       manifest, "path"),
            _run_suite(gxc, _COUNTS, _count_expectations(rules), counts, "label"),
        ]
        failures = _failure_lines(results, _Lines(manifest, profile, rules, previous_shares))
        evaluated = sum(v.statistics["evaluated_expectations"] for v in results)
        successful = sum(v.statistics["successful_expectations"] for v in results)
        statistics = {"evaluated_expectations": evaluated, "successful_expectations": successful,
                      "unsuccessful_expectations": evaluated - successful,
                      "success_percent": 100.0 * successful / evaluated if evaluated else 100.0}
        success = all(v.success for v in results)
        result = {"success": success, "statistics": statistics, "images": len(manifest),
                  "classes": counts.set_index("label")["images"].astype(int).to_dict(),
                  "failures": failures, "validation_results": [v.to_json_dict() for v in results]}
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(report_dir / REPORT_FILE, json.dumps(result, indent=1))
            _build_docs(gxc.context, report_dir / DOCS_DIR)
    log.info("validated %d images: %d of %d expectations met in %.2f s", len(manifest), successful, evaluated,
             time.perf_counter() - started)
    return ValidationReport(success=success, statistics=statistics, failures=failures, result=result,
                            report_dir=report_dir)
