"""`defectops`: the command line. One subcommand per verb; the work happens in components/."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from components.errors import DefectOpsError, UsageError, ValidationFailed

if TYPE_CHECKING:
    from components.config import Settings

app = typer.Typer(
    help="Keep the line's defect classifier trained, validated, approved and served.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Import, version, validate and synthesise image datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("defectops")

QUIET_LOGGERS = ("great_expectations", "dvc", "dvc_data", "dvc_objects", "scmrepo", "asyncssh", "fsspec",
                 "httpx", "urllib3", "PIL", "matplotlib", "numexpr")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _output_target(path: Path, option: str, example: str) -> Path:
    """Check an output file path before any work is done: a folder, or a parent that cannot be made or written
    to, is a usage error naming `option`."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file path, e.g. {path / example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = _nearest_existing(path.parent)
        why = f"{blocking} is a file" if blocking is not None and not blocking.is_dir() else exc.strerror
        raise UsageError(f"{option} {path}: cannot create {path.parent} ({why}); choose a writable path") from None
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"{option} {path}: {path.parent} is not writable; choose a writable path")
    return path


def _nearest_existing(path: Path) -> Path | None:
    """`path` or its nearest ancestor that exists: the file in the way when a folder cannot be made."""
    return next((folder for folder in (path, *path.parents) if folder.exists()), None)


def _json_target(path: Path | None) -> Path | None:
    """Check a `--json` path before any work is done: a folder, or a parent that cannot be made, is an error."""
    return None if path is None else _output_target(path, "--json", "report.json")


def _write_json(path: Path, value: Any) -> Path:
    """`value` as JSON at `path`, atomically; a failed write is one line, not a traceback."""
    from components.files import write_text_atomic

    try:
        return write_text_atomic(path, json.dumps(value, indent=2, default=str, allow_nan=True) + "\n")
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot write it ({exc.strerror}); choose a writable path") from None


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DefectOpsError into a one-line message and its exit code, never a traceback; a SIGTERM is
    handled as Ctrl-C, so it too leaves nothing half-written."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from components.signals import sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except ValidationFailed as exc:
            typer.echo(f"error: {exc}", err=True)
            for line in exc.failures:
                typer.echo(f"  - {line}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except DefectOpsError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; nothing half-written was kept, run the command again", 130) from None
        except Exception as exc:
            if (known := _dvc_error(exc)) is None:
                raise
            raise _fail(str(known), known.exit_code) from None

    return wrapper


def _dvc_error(exc: Exception) -> DefectOpsError | None:
    """A DVC exception that reached the command as the one-line error it means for the user; None for anything
    else. DVC is looked up in sys.modules, never imported here: a DVC error implies DVC is loaded."""
    from components.errors import ConcurrentRunError, one_line

    exceptions = sys.modules.get("dvc.exceptions")
    if exceptions is None or not isinstance(exc, exceptions.DvcException):
        return None
    from dvc.config import ConfigError
    from dvc.lock import LockError

    if isinstance(exc, LockError):
        return ConcurrentRunError("another DVC operation holds the lock on this project (.dvc/tmp/lock); wait for "
                                  "it to finish, then run the command again")
    reason = one_line(exc, 200)
    if isinstance(exc, ConfigError):
        remote = os.environ.get("DEFECTOPS_DVC_REMOTE")
        where = f"DEFECTOPS_DVC_REMOTE={remote}" if remote else "DEFECTOPS_DVC_REMOTE"
        return UsageError(f"DVC refused its configuration ({reason}); check {where} (an s3://, gs://, ssh:// ... "
                          "URL or a folder) and the project's .dvc/config and .dvc/config.local")
    cause = getattr(exc, "exc", None) or exc.__cause__  # e.g. a schema error's detail, which DVC prints apart
    if cause is not None and str(cause) and str(cause) not in str(exc):
        reason = one_line(f"{exc}: {cause}", 240)
    return DefectOpsError(f"DVC failed: {reason}")


@app.callback()
@friendly
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """Keep the line's defect classifier trained, validated, approved and served."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server's first start creates its database: 20 s is not enough on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    home = _checked_settings().home_dir  # the libraries' own state lives under the one state root too
    for var, sub in (("PREFECT_HOME", "prefect"), ("BENTOML_HOME", "bentoml"), ("MPLCONFIGDIR", "matplotlib")):
        if var not in os.environ:
            try:
                (home / sub).mkdir(parents=True, exist_ok=True)  # Prefect's sqlite cannot create its folder
            except OSError as exc:
                raise UsageError(f"the state root {home} (DEFECTOPS_HOME): cannot create {home / sub} "
                                 f"({exc.strerror}); set DEFECTOPS_HOME to a writable folder") from None
            os.environ[var] = str(home / sub)
    _setup_logging(verbose)


def _checked_settings() -> Settings:
    """The settings, or a one-line usage error naming the environment variable that is wrong: a value of the
    wrong type (DEFECTOPS_WORKERS=abc), or a state root that cannot be a folder (DEFECTOPS_HOME under a file)."""
    from pydantic import ValidationError

    from components.config import Settings, get_settings
    from components.errors import first_validation_error

    try:
        settings = get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else ""
        info = Settings.model_fields.get(field)
        variable = field if info is None else str(info.validation_alias or f"DEFECTOPS_{field.upper()}")
        reason = first_validation_error(exc).removeprefix(f"{field}: ")
        about = f" ({info.description})" if info is not None and info.description else ""
        raise UsageError(f"{variable}={os.environ.get(variable, first.get('input'))!r}: {reason}; set {variable} "
                         f"to a valid value{about} or unset it") from None
    home = settings.home_dir
    blocking = _nearest_existing(home)
    if blocking is not None and not blocking.is_dir():
        where = f"DEFECTOPS_HOME={home}" if settings.home is not None else \
            f"the state root {home} (DEFECTOPS_HOME unset: <project>/.defectops)"
        raise UsageError(f"{where}: {blocking} is a file, not a folder; set DEFECTOPS_HOME to a folder path")
    return settings


def _context():
    from components.config import get_settings, load_params

    settings = get_settings()
    return settings, load_params(settings.params_file)


# ------------------------------------------------------------------ data


@data_app.command("import")
@friendly
def data_import(
    source: Annotated[str, typer.Argument(help="Folder (ImageFolder or Magnetic Tile layout), .zip/.tar.gz, or URL.")],
    no_commit: Annotated[bool, typer.Option("--no-commit", help="Version with DVC but do not git-commit data.dvc.")] = False,
    no_push: Annotated[bool, typer.Option("--no-push", help="Do not push to the DVC remote now.")] = False,
) -> None:
    """Validate SOURCE with the tracked images, then add it as a new DVC dataset version."""
    from components.data.importer import import_data

    settings, params = _context()
    result = import_data(source, settings, params, commit_changes=not no_commit, push=not no_push, progress=True)
    if result.restored:
        typer.echo(f"restored dataset version {result.version} from {source}: {result.added} of its images were "
                   "missing from data/, the DVC cache and the remote, and the source put back exactly that version")
    elif not result.changed:
        typer.echo(f"nothing new: all {result.skipped} images are already tracked; "
                   f"dataset version {result.version} unchanged")
    else:
        typer.echo(f"dataset version {result.version} (+{result.added} images, {result.skipped} already tracked; "
                   f"previous {result.previous_version or 'none'})")
        typer.echo("  images per class: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
        typer.echo(f"  committed: {result.committed or 'no (--no-commit)'}; report: {result.report_dir}")
    _echo_push(result, asked=not no_push)


def _echo_push(result: Any, asked: bool = True) -> None:
    """An import's push outcome: a line, or a warning on stderr when the push failed (the version stands locally);
    with --no-push (`asked` False), how a new version reaches the remote later."""
    if result.pushed is not None:
        typer.echo(("  " if result.pushed else "warning: ") + result.push_message, err=not result.pushed)
    elif not asked and result.changed:
        typer.echo("  not pushed (--no-push): `defectops data push` sends it to the remote")


@data_app.command("validate")
@friendly
def data_validate(
    source: Annotated[str | None, typer.Argument(help="Folder, archive or URL to check without importing it. "
                                                      "Default: the tracked dataset.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result as JSON here.")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Validate this manifest (Parquet) instead of a SOURCE.")] = None,
) -> None:
    """Run the Great Expectations suite; exit 0 when it passes, 1 when expectations fail, 2 on usage errors."""
    from components.data.importer import recover
    from components.data.sources import open_source
    from components.data.tracked import data_lock, manifest_of, tracked_data
    from components.data.versioning import previous_version
    from components.errors import SourceError
    from components.validation.suite import class_shares, validate_manifest

    if source is not None and manifest is not None:
        raise UsageError(f"give SOURCE ({source}) or --manifest ({manifest}), not both: validate one of them at a "
                         "time")
    json_out = _json_target(json_out)
    settings, params = _context()
    settings.ensure()
    previous_shares = None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    if manifest is not None:
        frame, report_dir, what = _read_manifest(manifest), settings.reports_dir / "pipeline", str(manifest)
    elif source is not None:
        try:
            with open_source(source, settings.staging_dir) as root:
                frame = manifest_of(root, settings, params, progress=True)
        except SourceError as exc:  # exit 1 means "expectations failed": a source never read is a usage error
            raise UsageError(str(exc)) from exc
        report_dir, what = settings.reports_dir / "validations" / f"{stamp}-{Path(source).name}", source
    else:
        with data_lock(settings):  # never "recover" a live import
            recover(settings)
        tracked = tracked_data(settings, params, progress=True)
        frame, version = tracked.manifest, tracked.version or "untracked"
        report_dir, what = settings.dataset_report_dir(version), f"tracked dataset {version}"
        before = previous_version(settings.project_root, version)
        stored = settings.dataset_report_dir(before) / "manifest.parquet" if before else None
        previous_shares = class_shares(_read_manifest(stored)) if stored and stored.is_file() else None
    report = validate_manifest(frame, params.profile, params.validate_, previous_shares, report_dir)
    if json_out:
        _write_json(json_out, report.result)
    typer.echo(f"{what}: {len(frame)} images")
    typer.echo(report.summary())
    typer.echo(f"data docs: {report_dir / 'data_docs' / 'index.html'}")
    if not report.success:
        raise ValidationFailed(f"{len(report.failures)} expectation(s) failed for {what}; see the list above")


def _read_manifest(path: Path) -> Any:
    """A manifest written by `defectops data manifest`; a missing or unreadable file is a usage error."""
    import pandas as pd

    if not path.is_file():
        raise UsageError(f"{path}: no such manifest; write one with `defectops data manifest --out {path}`")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UsageError(f"{path}: not a readable Parquet manifest ({type(exc).__name__}); write one with "
                         "`defectops data manifest`") from exc


@data_app.command("manifest")
@friendly
def data_manifest(
    out: Annotated[Path, typer.Option(help="Where to write the manifest (Parquet).")] = Path("artifacts/manifest.parquet"),
) -> None:
    """Write the manifest of the tracked dataset (one row per image) with its committed splits."""
    from components.data.tracked import tracked_manifest
    from components.files import replacing

    out = _output_target(out, "--out", "manifest.parquet")
    settings, params = _context()
    settings.ensure()
    frame = tracked_manifest(settings, params, progress=True)
    try:
        with replacing(out) as partial:  # an interrupted write leaves the previous manifest, never half a file
            frame.drop(columns=["file"]).to_parquet(partial, index=False)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write it ({exc.strerror}); choose a writable path") from None
    typer.echo(f"{out}: {len(frame)} images, " + ", ".join(
        f"{s} {n}" for s, n in frame["split"].value_counts().sort_index().items()))


@data_app.command("synth")
@friendly
def data_synth(
    out: Annotated[Path, typer.Argument(help="Empty folder to write <class>/<image> into.")],
    count: Annotated[int | None, typer.Option(help="Number of images (default: params synth.count).")] = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels (default: params synth.image_size).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 42,
    image_format: Annotated[str | None, typer.Option("--format", help="jpg or png.")] = None,
) -> None:
    """Generate labelled synthetic images of parts with typical line defects, deterministically."""
    from components.data.synth import generate

    _, params = _context()
    summary = generate(out, params.synth.count if count is None else count,
                       params.synth.image_size if size is None else size, seed,
                       image_format or params.synth.image_format, progress=True)
    typer.echo(f"{sum(summary.counts.values())} images in {summary.out} ({summary.seconds:.1f} s): "
               + ", ".join(f"{k} {v}" for k, v in summary.counts.items()))


@data_app.command("push")
@friendly
def data_push() -> None:
    """Push the dataset versions not yet on the remote (a failed or interrupted push, --no-push), and dataset
    commits to DEFECTOPS_GIT_REMOTE."""
    from components.data.importer import recover
    from components.data.tracked import data_lock
    from components.data.versioning import DatasetRepo

    settings, _ = _context()
    settings.ensure()
    repo = DatasetRepo(settings)
    # never beside an import, a pull or another push; an import a kill left half-done is settled first (one
    # that had committed is kept and its version pushed here)
    with data_lock(settings):
        recover(settings)
        repo.ensure_initialised()
        outcome = repo.retry_pending()
    if outcome is None:
        typer.echo("nothing to push: every dataset version is on the remote")
    elif not outcome.pushed:
        raise DefectOpsError(outcome.message)
    else:
        typer.echo(outcome.message)


@data_app.command("pull")
@friendly
def data_pull(
    force: Annotated[bool, typer.Option("--force", help="Discard what differs in data/ (local changes).")] = False,
) -> None:
    """Bring the committed dataset version (data.dvc) into data/ from DVC's cache or the remote (a fresh clone)."""
    from components.data.tracked import restore_data

    settings, _ = _context()
    version = restore_data(settings, force=force)  # after settling an import a kill left half-done
    count = sum(1 for f in (settings.data_dir / "images").rglob("*") if f.is_file())
    typer.echo(f"dataset version {version}: {count} images in {settings.data_dir / 'images'}")


@data_app.command("status")
@friendly
def data_status() -> None:
    """Show the tracked dataset version, its images per class and split, and unpushed versions."""
    from components.data.tracked import committed_manifest, dataset_version, workspace_problem
    from components.data.versioning import DatasetRepo

    settings, params = _context()
    settings.ensure()
    typer.echo(f"project: {settings.project_root}\nstate:   {settings.home_dir}")
    typer.echo(f"dataset version: {dataset_version(settings.project_root) or 'none'}")
    repo = DatasetRepo(settings)
    unpushed = repo.unpushed_versions()
    typer.echo(f"unpushed versions: {', '.join(unpushed) if unpushed else 'none'}")
    if (waiting := repo.unpushed_commits()) is not None:
        typer.echo(f"dataset commits not yet pushed to git remote {waiting}: `defectops data push` retries")
    if (settings.data_dir / "images").is_dir() and (problem := workspace_problem(settings)):
        typer.echo(problem)
    elif (settings.data_dir / "images").is_dir():
        frame = committed_manifest(settings, params)  # checked just above
        table = frame.groupby(["label", "split"]).size().unstack(fill_value=0)
        typer.echo(table.to_string())
    elif dataset_version(settings.project_root):
        typer.echo(f"{settings.data_dir / 'images'} is absent (a fresh clone?): `defectops data pull` brings it")


# ------------------------------------------------------------------ training


@app.command()
@friendly
def train(
    profile: Annotated[str | None, typer.Option(help="Hardware profile from params.yaml train.profiles "
                                                     "(default: gpu with CUDA, else cpu).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for model.pt, train_metrics.json, history.csv.")] = Path("artifacts/train"),
) -> None:
    """Train on the tracked dataset, then calibrate on validation (temperature + review threshold)."""
    from components.training.calibrate import train_and_calibrate

    settings, params = _context()
    settings.ensure()
    try:
        result = train_and_calibrate(settings, params, profile, resume, out)
    except KeyboardInterrupt:
        raise _fail("interrupted; no model was written, but the last finished epoch's checkpoint is kept: "
                    "`defectops train --resume` (same options) continues from it", 130) from None
    cal = result["calibration"]
    typer.echo(f"model: {result['model_path']}  (val macro-F1 of the kept epoch {result['best_val_macro_f1']:.3f}, "
               f"{result['seconds']:.0f} s, {result['profile']} profile)")
    typer.echo(f"calibration: temperature {cal['temperature']:.3f}, review threshold {cal['threshold']:.4f} "
               f"(val auto_precision {cal['val_auto_precision']}, review rate {cal['val_review_rate']})")


# ------------------------------------------------------------------ the main job


@app.command()
@friendly
def demo(
    source: Annotated[str | None, typer.Option(help="Demo data (default: $DEFECTOPS_DEMO_DATA, else the public "
                                                    "Magnetic Tile archive, else synthetic images).")] = None,
    profile: Annotated[str | None, typer.Option(help="Training profile (default: gpu with CUDA, else cpu).")] = None,
    port: Annotated[int | None, typer.Option(help="Service port (default: serve.port in params.yaml).")] = None,
    keep_serving: Annotated[bool, typer.Option("--keep-serving", help="Leave the service running at the end.")]
    = False,
    images: Annotated[int, typer.Option(help="Golden test images to send through the service (each twice: as "
                                             "taken, and under a dimmer lamp).")] = 200,
) -> None:
    """The main job: the whole monthly loop on this machine, from import to a served, drift-checked model.

    Imports the demo data, runs monthly retraining, approves the challenger as a named demo user only if it
    passed the gate, promotes it, serves it, sends real and lighting-shifted images, checks drift, stops.
    """
    from components.config import get_settings
    from components.data.sources import check_local_source
    from components.serving.params import serve_params
    from flows.demo_flow import run_demo

    _registry_logging()
    settings, params = _context()
    settings.ensure()
    chosen = source or resolve_demo_source(settings)
    check_local_source(chosen)  # before a Prefect server is started for the flows
    port = port or serve_params(params).port
    outcome = run_demo(get_settings(), settings.params_file, chosen, profile, port, keep_serving, images,
                       echo=typer.echo)
    registered = outcome["retraining"]["registered"]
    typer.echo(f"\ndone in {outcome['minutes']} min. Where to look:")
    typer.echo(f"  models and runs:  uv run mlflow ui --backend-store-uri {settings.tracking_uri}   "
               "(then http://127.0.0.1:5000)")
    typer.echo("  versions:         uv run defectops models")
    typer.echo(f"  comparison:       {registered['comparison_path']}")
    typer.echo(f"  data validation:  {settings.reports_dir / 'datasets'}")
    typer.echo(f"  drift reports:    {outcome['drift']['clean']['report_dir']} (clean), "
               f"{outcome['drift']['shifted']['report_dir']} (shifted)")
    typer.echo(f"  production log:   {settings.prod_log_dir}; review queue: {settings.review_queue_dir}")
    typer.echo(f"  service log:      {outcome['service_log']}")
    if keep_serving:
        typer.echo(f"  service:          {outcome['service_url']} (pid {outcome['service_pid']}; POST /predict, "
                   "GET /metrics); stop it with `kill <pid>`")
    typer.echo("  schedules:        uv run defectops schedule   (Prefect UI on http://127.0.0.1:4200)")


def resolve_demo_source(settings: Any) -> str:
    """DEFECTOPS_DEMO_DATA, else ../shared/datasets/magnetic-tile, else the public archive if reachable, else
    freshly generated synthetic images."""
    from components.data.demo import demo_source

    return demo_source(settings)


# ------------------------------------------------------------------ registry
# --- registry: register / approve / reject / models / evaluate (components/registry)

REGISTRY_QUIET_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.utils.uv_utils")


def _registry_logging() -> None:
    for name in REGISTRY_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _in_project(path: Path, settings: Any) -> Path:
    """A relative path as given when it exists from here, else relative to the project root."""
    if path.is_absolute() or path.exists():
        return path
    return settings.project_root / path


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _echo_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Rows under a header, in columns as wide as their widest cell."""
    table = [header, *rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@app.command()
@friendly
def register(
    train_dir: Annotated[Path, typer.Option(help="Folder with model.pt, train_metrics.json and history.csv "
                                                 "(relative paths also resolve from the project root).")]
    = Path("artifacts/train"),
    force: Annotated[bool, typer.Option("--force", help="Register again even if this exact model and dataset "
                                                        "are already a version.")] = False,
) -> None:
    """Evaluate the trained model on the golden test split, register it as `challenger` and gate it."""
    from components.registry.registry import register as register_model

    _registry_logging()
    settings, params = _context()
    result = register_model(settings, params, _in_project(train_dir, settings), force=force)
    if not result.created:
        typer.echo(f"already registered: version {result.version} (same model file and dataset); nothing changed")
    else:
        typer.echo(f"registered defect-classifier version {result.version} (run {result.run_id}), alias challenger")
    m = result.metrics
    typer.echo(f"  golden test: macro_f1 {_figure(m.get('test_macro_f1'))}, defect detection "
               f"{_figure(m.get('test_defect_detection_rate'))}, escape {_figure(m.get('test_escape_rate'))}, "
               f"review {_figure(m.get('test_review_rate'))}")
    typer.echo(f"  gate {'PASSED' if result.gate_passed else 'FAILED'} (vs champion {result.compared_with}); "
               f"approval: {result.approval_status}")
    for reason in result.gate_reasons:
        typer.echo(f"    - {reason}")
    if result.comparison_path:
        typer.echo(f"  comparison: {result.comparison_path}")
    if result.created and result.gate_passed:
        typer.echo(f"  next: defectops approve {result.version} --by NAME  (or reject {result.version} --by NAME "
                   "--reason ...)")


@app.command()
@friendly
def approve(
    version: Annotated[str, typer.Argument(help="Model version to make champion (see `defectops models`).")],
    by: Annotated[str, typer.Option("--by", help="Who approves (name or e-mail); recorded in the audit trail.")],
    note: Annotated[str | None, typer.Option(help="Why, ticket number, review notes.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Approve although the gate failed or is stale (gated "
                                                        "against a replaced champion), or a person rejected or "
                                                        "rolled the version back; needs --note, and what was "
                                                        "overridden stays on record.")]
    = False,
) -> None:
    """Promote a version whose gate passed: move the `champion` alias to it and record who and why."""
    from components.config import get_settings
    from components.registry.registry import approve as approve_version

    _registry_logging()
    outcome = approve_version(get_settings(), version, by, note, force=force)
    if not outcome["changed"]:
        typer.echo(f"version {outcome['version']} is already the champion; nothing changed")
    else:
        typer.echo(f"version {outcome['version']} is now the champion (previous: "
                   f"{outcome['previous_champion'] or 'none'}); approved by {by}"
                   + (" (gate overridden)" if force else ""))


@app.command()
@friendly
def reject(
    version: Annotated[str, typer.Argument(help="Model version to reject (see `defectops models`).")],
    by: Annotated[str, typer.Option("--by", help="Who rejects (name or e-mail).")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the version and in the audit trail.")],
) -> None:
    """Reject a candidate: tag it, take `challenger` off it. The champion is never touched."""
    from components.config import get_settings
    from components.registry.registry import reject as reject_version

    _registry_logging()
    outcome = reject_version(get_settings(), version, by, reason)
    typer.echo(f"version {outcome['version']} rejected by {by}"
               + ("; challenger alias removed" if outcome["challenger_removed"] else ""))


@app.command()
@friendly
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print the versions as JSON.")] = False,
) -> None:
    """List the registered versions: aliases, gate and approval state, key golden-test figures."""
    from components.config import get_settings
    from components.registry.registry import list_versions

    _registry_logging()
    settings = get_settings()
    rows = list_versions(settings)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no registered versions in {settings.tracking_uri}; run `defectops register`")
        return
    header = ("version", "aliases", "created (UTC)", "dataset", "gate", "approval", "macro_f1", "detect",
              "escape", "review")
    _echo_table(header, [
        (r["version"], ",".join(r["aliases"]) or "-", r["created"].replace("+00:00", "").replace("T", " "),
         (r["dataset_version"] or "-")[:8], r["gate_status"] or "-", r["approval_status"] or "-",
         _figure(r["macro_f1"]), _figure(r["defect_detection_rate"]), _figure(r["escape_rate"]),
         _figure(r["review_rate"]))
        for r in rows])


@app.command()
@friendly
def evaluate(
    model: Annotated[str, typer.Option(help="champion, challenger, a version number, models:/... URI or a "
                                            "model.pt path.")] = "champion",
    data: Annotated[str | None, typer.Option(help="Labelled folder (or archive) in a supported layout, "
                                                  "evaluated without importing it. Default: the tracked "
                                                  "dataset.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON here.")] = None,
    split: Annotated[str | None, typer.Option(help="train, val, test or all (default: test for the tracked "
                                                   "dataset, all for --data).")] = None,
) -> None:
    """Evaluate any model on any labelled images: accuracy, macro F1, plant figures, calibration."""
    from components.registry.evaluate import evaluate_model

    _registry_logging()
    json_out = _json_target(json_out)
    settings, params = _context()
    report = evaluate_model(settings, params, model, data, split)
    typer.echo(f"{report['model_version']} on {report['data']} ({report['split']}): {report['n_images']} images")
    typer.echo(f"  accuracy {_figure(report['accuracy'])}, macro_f1 {_figure(report['macro_f1'])}, defect "
               f"detection {_figure(report['defect_detection_rate'])}, false alarms "
               f"{_figure(report['false_alarm_rate'])}, escape {_figure(report['escape_rate'])}, review "
               f"{_figure(report['review_rate'])}, ECE {_figure(report['ece'])}")
    if json_out:
        typer.echo(f"  report: {_write_json(json_out, report)}")


# ------------------------------------------------------------------ serving
# --- serving: serve / review import (components/serving)

review_app = typer.Typer(help="The review queue: turn reviewed images into labelled data.", no_args_is_help=True)
app.add_typer(review_app, name="review")


@app.command()
@friendly
def serve(
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: serve.port in params.yaml).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the service local.")] = "127.0.0.1",
) -> None:
    """Serve the deployed model with BentoML; with no deployment yet, pin the approved champion first."""
    from components.serving.run import prepare_and_serve

    settings, params = _context()
    prepare_and_serve(settings, params, port, host, echo=typer.echo)


@review_app.command("import")
@friendly
def review_import(
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV with columns file,label; file is a review "
                                                                  "item's path, file name or request id.")] = None,
    folder: Annotated[Path | None, typer.Option("--folder", help="Folder of reviewed images sorted into "
                                                                  "<label>/ sub-folders.")] = None,
    no_commit: Annotated[bool, typer.Option("--no-commit", help="Version with DVC but do not git-commit.")] = False,
    no_push: Annotated[bool, typer.Option("--no-push", help="Do not push to the DVC remote now.")] = False,
) -> None:
    """Import reviewed images as labelled data for the next dataset version (validated like any import)."""
    from components.serving.review import import_reviewed

    settings, params = _context()
    result = import_reviewed(settings, params, labels, folder, commit_changes=not no_commit, push=not no_push,
                             progress=True)
    typer.echo(f"dataset version {result.version} (+{result.added} reviewed images, {result.skipped} already "
               f"tracked); {result.review_items_imported} review items moved to imported/")
    _echo_push(result, asked=not no_push)


def _promotion_lines(result: Any) -> list[str]:
    if not result.changed:
        return [(f"{result.model_version} is already the deployed version ({result.service} at "
                 f"{result.service_url}); nothing changed")]
    replicas = f"{result.replicas} replica{'s' if result.replicas != 1 else ''}"
    service = {"swapped": f"the service now serves it on {replicas} (hot swap, no restart; {result.service_url})",
               "not running": (f"no service answers at {result.service_url}: it serves this version when "
                               "started (`defectops serve`)")}[result.service]
    deployed = (f"deployed {result.model_version} on {result.fast_path} (was {result.previous or 'nothing'}) in "
                f"{result.seconds:.0f} s; bento {result.bento or 'not built (--no-bento)'}")
    if result.completed:
        deployed = (f"completed the record of {result.model_version}'s deployment (the run that deployed it stopped "
                    f"before its tags and audit line; was {result.previous or 'nothing'})")
    return [deployed, f"  {service}"]


@app.command()
@friendly
def replicas(
    json_out: Annotated[bool, typer.Option("--json", help="Print the replicas' status files as JSON.")] = False,
) -> None:
    """The service replicas on this state root: what each serves, is loading or refused, and its heartbeat."""
    from datetime import UTC, datetime

    from components.serving.params import serve_params
    from components.serving.replicas import FOLDER, stale_after
    from components.serving.replicas import replicas as reported

    settings, params = _context()
    live, gone = reported(settings, stale_after(serve_params(params).reload_poll_seconds))
    if json_out:
        typer.echo(json.dumps({"live": [r.model_dump() for r in live], "gone": [r.model_dump() for r in gone]},
                              indent=2))
        return
    if not live and not gone:
        typer.echo(f"no service replica has reported in {settings.state_dir / FOLDER}; start one with "
                   "`defectops serve`")
        return
    now = datetime.now(UTC)
    _echo_table(("replica", "state", "serves", "engine", "device", "heartbeat", "loading", "last refused"), [
        (r.replica, state, r.model_version, r.fast_path, r.device, f"{r.age(now).total_seconds():.0f} s ago",
         r.loading or "-", f"{r.refused_version or r.refused}: {r.refused_error}" if r.refused else "-")
        for state, group in (("live", live), ("gone", gone)) for r in group])


@app.command()
@friendly
def promote(
    by: Annotated[str, typer.Option("--by", help="Who or what deploys (recorded as deployed_by).")] = "defectops promote",
    service_url: Annotated[str | None, typer.Option(help="The running service (default: $DEFECTOPS_SERVICE_URL, "
                                                         "else 127.0.0.1 on serve.port).")] = None,
    no_bento: Annotated[bool, typer.Option("--no-bento", help="Do not build a Bento of this version.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Try again a champion the service refused before.")] = False,
) -> None:
    """Deploy the approved champion into the running service (hot swap) when it is not deployed yet."""
    from components.serving.promotion import promote as promote_champion

    _registry_logging()
    settings, params = _context()
    settings.ensure()
    result = promote_champion(settings, params, by, service_url, bento=not no_bento, force=force)
    for line in _promotion_lines(result):
        typer.echo(line)


@app.command()
@friendly
def rollback(
    by: Annotated[str, typer.Option("--by", help="Who rolls back (name or e-mail); recorded like an approval.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on both versions and in the audit trail.")],
    service_url: Annotated[str | None, typer.Option(help="The running service (default as for promote).")] = None,
    no_bento: Annotated[bool, typer.Option("--no-bento", help="Do not build a Bento of this version.")] = False,
) -> None:
    """Move `champion` back to the version deployed before the current one and deploy it."""
    from components.serving.promotion import rollback as rollback_deployment

    _registry_logging()
    settings, params = _context()
    settings.ensure()
    moved, result = rollback_deployment(settings, params, by, reason, service_url, bento=not no_bento)
    typer.echo(f"champion moved back from version {moved['from_version']} to {moved['version']} by {by}")
    for line in _promotion_lines(result):
        typer.echo(line)


# ------------------------------------------------------------------ drift
# --- drift: drift (components/drift)

DRIFT_QUIET_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.utils.uv_utils")


@app.command()
@friendly
def drift(
    since: Annotated[str | None, typer.Option(help="Window start (UTC): ISO date/time, or 30d / 12h ago. "
                                                   "Default: drift.window_days before --until.")] = None,
    until: Annotated[str | None, typer.Option(help="Window end, exclusive: ISO date/time or 2d ago. "
                                                   "Default: now.")] = None,
    model: Annotated[str | None, typer.Option(help="Model of the reference: champion, challenger, a version, "
                                                   "models:/... URI or a model.pt path. Default: the one the "
                                                   "service serves (its deployment record), else champion.")
                     ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the summary JSON here.")] = None,
    mlflow: Annotated[bool, typer.Option("--mlflow", help="Log the reports to MLflow (they are logged anyway "
                                                          "when an MLflow run is active).")] = False,
    rebuild_reference: Annotated[bool, typer.Option("--rebuild-reference", help="Build the cached reference "
                                                                               "again.")] = False,
) -> None:
    """Compare a production-log window with the training reference: exit 0 no drift, 3 drift, 1/2 errors."""
    from components.drift.check import (
        describe_answers,
        describe_column_alarm,
        describe_embedding,
        run_drift_check,
    )

    for name in DRIFT_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    json_out = _json_target(json_out)
    settings, params = _context()
    check = run_drift_check(settings, params, model, since, until, to_mlflow=mlflow or None,
                            rebuild_reference=rebuild_reference)
    s = check.summary
    typer.echo(f"window {s['window']['since']} .. {s['window']['until']} (UTC): {s['n_current']} predictions, "
               f"{s['skipped_lines']} torn/invalid log lines skipped")
    if s["status"] == "not_enough_data":
        typer.echo(f"warning: {s['message']}", err=True)
    else:
        typer.echo(f"  model {s['model_version']}, dataset {(s['dataset_version'] or '-')[:8]}: reference "
                   f"{s['n_reference']} images, {s['n_reference_predictions']} answers")
        typer.echo(f"  dataset drift: {'yes' if s['dataset_drift'] else 'no'} ({s['n_drifted_columns']} of "
                   f"{len(s['columns'])} columns, share {s['drift_share']:.2f}, threshold "
                   f"{s['drift_share_threshold']}); drifted: {', '.join(s['drifted_columns']) or 'none'}")
        typer.echo(f"  column alarm: {describe_column_alarm(s)}")
        emb = s["embedding_drift"]
        typer.echo("  embedding drift: " + (f"{'yes' if emb['drifted'] else 'no'} ({describe_embedding(emb)})"
                                             if emb else "not computed"))
        typer.echo(f"  answers compared with {describe_answers(s)}")
        typer.echo(("DRIFT DETECTED" if check.drift else "no drift") + f" ({s['rule']})")
    for note in s.get("notes") or []:  # records of other model versions, columns left out, no embedding check
        typer.echo(f"  note: {note}")
    typer.echo(f"reports: {check.report_dir}")
    if json_out:
        _write_json(json_out, s)
    if check.exit_code:
        raise typer.Exit(check.exit_code)


# ------------------------------------------------------------------ schedule
# --- schedule: serve prefect.yaml's deployments on a Prefect server (components/schedule.py)


@app.command()
@friendly
def schedule(
    port: Annotated[int, typer.Option(help="Port of the local Prefect server (UI + API).")] = 4200,
    host: Annotated[str, typer.Option(help="Address the local Prefect server binds.")] = "127.0.0.1",
    only: Annotated[list[str] | None, typer.Option("--only", help="Serve only this deployment of prefect.yaml "
                                                                  "(repeatable).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Start nothing: load prefect.yaml and its flows, print "
                                                        "each schedule and its next 3 runs.")] = False,
) -> None:
    """Serve prefect.yaml's deployments on their schedules: on $PREFECT_API_URL, else on a local server."""
    from components.config import get_settings
    from components.schedule import check_deployments, run_schedule

    settings = get_settings()
    if check:
        check_deployments(settings, only or [], echo=typer.echo)
    else:
        run_schedule(settings, host, port, only or [], echo=typer.echo)


if __name__ == "__main__":
    app()
