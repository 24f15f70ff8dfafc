"""The README's main command: the whole monthly loop on one machine, end to end (`defectops demo`).

1. `monthly-retraining` on the demo data: import + GX validation + DVC version, drift on last month's log,
   train the challenger, gate it against the champion (or the fixed minimums), request approval;
2. approve it as the named demo user, only if it passed the gate: the demo doing what an ML engineer does in
   MLflow or with `defectops approve`. A failed gate stops the demo here, with the reasons;
3. `promote-approved`: parity of the fast path, Bento, deployment record;
4. start the service (`defectops serve`) on 127.0.0.1;
5. send the golden test images through it, then the same images under a dimmer lamp (a lighting change);
6. drift check on each of the two windows: the clean one should stay quiet, the shifted one should not;
7. stop the service (unless kept) and print where to look.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import Params, Settings
from components.errors import DefectOpsError

DEMO_USER = "demo (standing in for an ML engineer)"
LIGHTING = {"gain": 0.7, "contrast": 0.8}  # a 30 % dimmer lamp with flatter contrast


class GateFailed(DefectOpsError):
    """The challenger did not pass the gate: nothing is approved, promoted or served."""

    exit_code = 4


def _golden_images(settings: Settings, params: Params, limit: int) -> list[Path]:
    """The tracked golden test images (real parts the model never trained on), at most `limit`, in a fixed order."""
    from components.data.tracked import tracked_manifest, usable_rows

    rows = usable_rows(tracked_manifest(settings, params), "the tracked dataset")
    test = rows[rows["split"] == "test"].sort_values("path")
    return [Path(file) for file in test["file"].head(limit)]


def _shifted_png(path: Path) -> bytes:
    """The image under the demo's lighting change, as PNG bytes."""
    from PIL import Image

    from components.data.images import decode
    from components.drift.simulate import lighting_change

    rgb = lighting_change(decode(path.read_bytes(), 10**9).rgb, **LIGHTING)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def send_images(url: str, images: list[Path], shifted: bool) -> dict[str, Any]:
    """Classify each image through the line client; decisions counted, failures (fail-safe reviews) too."""
    from components.serving.client import LineClient

    counts: dict[str, int] = {}
    fail_safe, latencies = 0, []
    with LineClient(url, timeout_s=30.0) as client:
        for i, path in enumerate(images):
            raw = _shifted_png(path) if shifted else path.read_bytes()
            name = f"{path.stem}.png" if shifted else path.name
            result = client.classify(raw, filename=name, line="demo", camera="shifted" if shifted else "cam-1",
                                     part_id=f"demo-{i:04d}")
            counts[result.decision] = counts.get(result.decision, 0) + 1
            fail_safe += result.fail_safe
            latencies.append(result.latency_ms)
    latencies.sort()
    return {"images": len(images), "decisions": counts, "fail_safe": fail_safe,
            "p50_ms": round(latencies[len(latencies) // 2], 1) if latencies else None}


def _drift(settings: Settings, params: Params, since: datetime, until: datetime) -> dict[str, Any]:
    from components.drift.check import run_drift_check

    check = run_drift_check(settings, params, since=since.isoformat(), until=until.isoformat())
    s = check.summary
    reasons = [f"columns: {', '.join(s['drifted_columns'])}"] if s.get("drifted_columns") else []
    if s.get("column_alarm"):
        reasons.append(f"column alarm: {', '.join(s['column_alarm'])}")
    if (s.get("embedding_drift") or {}).get("drifted"):
        reasons.append("embeddings")
    return {"drift": check.drift, "n": s["n_current"], "drifted_columns": s.get("drifted_columns") or [],
            "reasons": reasons, "report_dir": str(check.report_dir)}


def _wait_for_log(settings: Settings, since: datetime, expected: int, timeout_s: float = 30.0) -> None:
    """The service writes its log off the request path: wait until the window holds what was sent."""
    from components.drift.current import read_current
    from components.drift.window import Window

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_current(settings.prod_log_dir, Window(since, datetime.now(UTC))).n >= expected:
            return
        time.sleep(0.5)


def run_demo(settings: Settings, params_file: Path, source: str, profile: str | None, port: int,
             keep_serving: bool, images: int, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole loop (module docstring); returns what happened at each step."""
    from components.config import load_params
    from components.registry.registry import approve
    from components.serving.run import start_in_background, stop_background
    from flows.monthly_flow import monthly_retraining
    from flows.promotion_flow import promote_approved

    started = time.monotonic()
    echo(f"[1/7] monthly retraining on {source}: import, validate, version, drift, train, gate")
    retraining = monthly_retraining(new_data=source, profile=profile)
    registered = retraining["registered"]
    version = registered["version"]
    echo(f"      challenger v{version}: gate {'passed' if registered['gate_passed'] else 'FAILED'}")
    for reason in registered["gate_reasons"]:
        echo(f"        - {reason}")
    if not registered["gate_passed"]:
        raise GateFailed(f"version {version} did not pass the gate, so the demo approves nothing and stops "
                         f"(comparison: {registered['comparison_path']}); an engineer could still accept it with "
                         f"`defectops approve {version} --by NAME --force --note WHY`")

    echo(f"[2/7] approving v{version} as '{DEMO_USER}': the gate passed (in a plant: a person, in MLflow or with "
         "`defectops approve`)")
    approve(settings, version, by=DEMO_USER,
            note="approved by `defectops demo` because the gate passed; in a plant an ML engineer decides")

    url = f"http://127.0.0.1:{port}"
    echo("[3/7] promoting the approved champion (parity of the fast path, Bento, deployment record)")
    promotion = promote_approved(by="defectops demo", service_url=url)
    echo(f"      {promotion.get('model_version')} on {promotion.get('fast_path') or 'already deployed'}; bento "
         f"{promotion.get('bento') or '-'}")

    log_file = settings.home_dir / "logs" / "demo-service.log"
    echo(f"[4/7] starting the service on {url} (log: {log_file})")
    service = start_in_background(settings, port, log_file)
    try:
        params = load_params(params_file)
        golden = _golden_images(settings, params, images)
        echo(f"[5/7] sending {len(golden)} golden test images, then the same under a dimmer lamp {LIGHTING}")
        clean_from = datetime.now(UTC)
        clean = send_images(url, golden, shifted=False)
        shifted_from = datetime.now(UTC)
        shifted = send_images(url, golden, shifted=True)
        until = datetime.now(UTC)
        _wait_for_log(settings, clean_from, clean["images"] + shifted["images"])
        echo(f"      clean: {clean['decisions']}, shifted: {shifted['decisions']} (p50 {clean['p50_ms']} ms)")
        echo("[6/7] drift checks: the clean window, then the shifted one")
        drift_clean = _drift(settings, params, clean_from, shifted_from)
        drift_shifted = _drift(settings, params, shifted_from, until)
        for name, outcome in (("clean", drift_clean), ("shifted", drift_shifted)):
            echo(f"      {name}: {'DRIFT' if outcome['drift'] else 'no drift'} over {outcome['n']} predictions "
                 f"({'; '.join(outcome['reasons']) or 'nothing drifted'})")
    finally:
        if not keep_serving:
            echo("[7/7] stopping the service (--keep-serving leaves it running)")
            stop_background(service, port=port)
    minutes = (time.monotonic() - started) / 60
    return {"retraining": retraining, "approved": version, "promotion": promotion, "service_url": url,
            "service_pid": service.pid if keep_serving else None, "service_log": str(log_file),
            "sent": {"clean": clean, "shifted": shifted},
            "drift": {"clean": drift_clean, "shifted": drift_shifted}, "minutes": round(minutes, 1)}
