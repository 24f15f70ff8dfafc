"""Runtime settings (environment, embedded defaults) and typed experiment params (params.yaml).

Nothing here touches the disk at import time: `get_settings()` resolves paths, `Settings.ensure()` creates them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from components.errors import UsageError, first_validation_error, one_line

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def find_project_root(start: Path | None = None) -> Path:
    """The project folder: the one holding params.yaml, found from `start` upwards, else the installed checkout."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "pyproject.toml").is_file():
            return folder
    return PACKAGE_ROOT


class Settings(BaseSettings):
    """Where things live and which servers to talk to. Every value has an embedded default."""

    model_config = SettingsConfigDict(env_prefix="DEFECTOPS_", extra="ignore")

    project: Path | None = Field(None, description="project root (git + DVC repo holding params.yaml and data/)")
    home: Path | None = Field(None, description="root of everything the system writes; default <project>/.defectops")
    demo_data: str | None = Field(None, description="demo source: folder, archive or URL")
    dvc_remote: str | None = Field(None, description="DVC remote URL; default a folder under home")
    dvc_remote_endpoint: str | None = Field(None, description="S3 endpoint URL, for MinIO")
    git_remote: str | None = Field(None, description="git remote that dataset commits (data.dvc, splits.csv) are "
                                   "pushed to after their images, e.g. origin; none: they stay in this checkout")
    service_url: str | None = Field(None, description="the running service promotion swaps and waits for; "
                                    "default http://127.0.0.1:<serve.port>")
    workers: int = Field(0, description="processes for manifest building; 0 = one per CPU core")
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")

    @cached_property
    def project_root(self) -> Path:
        return (self.project or find_project_root()).resolve()

    @cached_property
    def home_dir(self) -> Path:
        return (self.home or self.project_root / ".defectops").expanduser().resolve()

    @property
    def params_file(self) -> Path:
        return self.project_root / "params.yaml"

    @property
    def data_dir(self) -> Path:
        return self.project_root / "data"

    @property
    def splits_file(self) -> Path:
        """Split assignment of every tracked image, committed next to data.dvc so splits never move."""
        return self.project_root / "splits.csv"

    @property
    def reports_dir(self) -> Path:
        return self.home_dir / "reports"

    @property
    def cache_dir(self) -> Path:
        return self.home_dir / "cache"

    @property
    def staging_dir(self) -> Path:
        return self.home_dir / "staging"

    @property
    def locks_dir(self) -> Path:
        return self.home_dir / "locks"

    @property
    def state_dir(self) -> Path:
        return self.home_dir / "state"

    @property
    def prod_log_dir(self) -> Path:
        return self.home_dir / "production-log"

    @property
    def review_queue_dir(self) -> Path:
        return self.home_dir / "review-queue"

    @property
    def mlflow_dir(self) -> Path:
        return self.home_dir / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def dvc_remote_url(self) -> str:
        return self.dvc_remote or str(self.home_dir / "dvc-remote")

    def dataset_report_dir(self, version: str) -> Path:
        return self.reports_dir / "datasets" / version.removesuffix(".dir")

    def ensure(self) -> Settings:
        """Create the state folders (called by commands, never at import)."""
        for folder in (self.home_dir, self.reports_dir, self.cache_dir, self.staging_dir, self.locks_dir,
                       self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def get_settings() -> Settings:
    """Settings from the current environment (re-read on each call, so tests can change it)."""
    return Settings()


# ---------------------------------------------------------------- params.yaml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseParams(_Section):
    seed: int = 42


class GroupingParams(_Section):
    """How images are grouped into captures that must share a split."""

    rule: Literal["image", "pattern", "capture_gap"] = "image"
    pattern: str | None = Field(None, description="regex on the file stem; its first group is the group key")
    number_pattern: str = Field(r"num_(\d+)", description="capture_gap: regex whose first group is the capture number")
    max_gap: int = Field(300, description="capture_gap: a new capture starts where the number jumps by more")
    exposure_pattern: str | None = Field(
        None, description="capture_gap: regex whose first group is the exposure index (e.g. 'exp(\\d+)_'); with "
        "it, a jump up to max_gap_rising still continues the capture while the exposure index rises")
    max_gap_rising: int = Field(600, description="capture_gap with exposure_pattern: see there")

    @model_validator(mode="after")
    def _pattern_given(self) -> GroupingParams:
        if self.rule == "pattern" and not self.pattern:
            raise ValueError("grouping.rule 'pattern' needs grouping.pattern (a regex with one group)")
        return self


class DatasetProfile(_Section):
    """What a dataset is expected to hold: its classes, which one is normal, how captures group."""

    normal_class: str
    classes: list[str]
    grouping: GroupingParams = GroupingParams()

    @model_validator(mode="after")
    def _normal_is_a_class(self) -> DatasetProfile:
        if self.normal_class not in self.classes:
            raise ValueError(f"normal_class {self.normal_class!r} is not in classes {self.classes}")
        return self

    @property
    def defect_classes(self) -> list[str]:
        return [c for c in self.classes if c != self.normal_class]


class SplitParams(_Section):
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions must add up to 1")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class DataParams(_Section):
    dataset: str = Field(description="which entry of `datasets` describes the tracked data")
    split: SplitParams = SplitParams()
    max_image_pixels: int = Field(40_000_000, description="larger images are refused (decompression bombs)")


class Range(_Section):
    min: float | None = None
    max: float | None = None
    mostly: float = 1.0


class ValidateParams(_Section):
    min_images_per_class: int = 10
    width: Range = Range(min=32, max=8192)
    height: Range = Range(min=32, max=8192)
    modes: list[str] = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "I;16B", "I;16L"]
    brightness: Range = Range(min=5, max=250, mostly=0.99)
    contrast: Range = Range(min=1, max=128, mostly=0.99)
    sharpness: Range = Range(min=0.5, max=None, mostly=0.99)
    max_class_shift_kl: float = Field(0.1, description="KL divergence of class shares vs the previous version")


class SynthParams(_Section):
    image_size: int = 128
    count: int = 800
    image_format: Literal["png", "jpg"] = "jpg"


class Params(_Section):
    base: BaseParams = BaseParams()
    data: DataParams
    datasets: dict[str, DatasetProfile]
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    synth: SynthParams = SynthParams()
    # later stages (train, evaluate, serve, drift) are validated by their own components
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _dataset_known(self) -> Params:
        if self.data.dataset not in self.datasets:
            raise ValueError(f"data.dataset {self.data.dataset!r} is not one of datasets: {sorted(self.datasets)}")
        return self

    @property
    def profile(self) -> DatasetProfile:
        return self.datasets[self.data.dataset]


def load_params(path: Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Read and validate params.yaml, with `dotted.key=value` overrides applied; a bad file is a usage error
    naming the key."""
    path = path or get_settings().params_file
    if not path.is_file():
        raise UsageError(f"{path}: params file not found; run from the project or set DEFECTOPS_PROJECT")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise UsageError(f"{path}: not valid YAML{where} ({one_line(problem)}); fix the file") from exc
    for assignment in overrides:
        override_param(raw, assignment)
    try:
        return Params.model_validate(raw)
    except ValueError as exc:
        raise UsageError(f"{path}: invalid params: {first_validation_error(exc)}; fix that key") from exc


def override_param(raw: dict, assignment: str) -> None:
    """Set one `dotted.key=value` in a params dict, the value read as YAML (as `dvc exp run -S` does): e.g.
    `train.profiles.cpu.epochs=150` or `augment.affine_scale=[0.6, 1.25]`. The sections must exist."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"override {assignment!r}: write KEY=VALUE, e.g. train.profiles.cpu.epochs=60")
    *sections, leaf = key.strip().split(".")
    node = raw
    for depth, name in enumerate(sections):
        node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise UsageError(f"override {assignment!r}: {'.'.join(sections[:depth + 1])} is not a section of "
                             "params.yaml; check the key")
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"override {assignment!r}: the value is not valid YAML ({exc})") from exc


def cpu_workers(settings: Settings) -> int:
    return settings.workers or max(1, len(os.sched_getaffinity(0)))
