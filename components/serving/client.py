"""The line's client: classify a part within a deadline; when anything goes wrong the part goes to review.

Fail-safe rule: a part is auto-accepted (or auto-rejected) only on a well-formed answer from the service.
A service that is down, slow (over the deadline), overloaded (503, retried once while time is left),
refusing the image (4xx) or answering nonsense yields decision `review` with `fail_safe=True` and the reason.

    with LineClient("http://127.0.0.1:3000", timeout_s=2.0) as client:
        result = client.classify(Path("part.jpg"), line="L1", camera="C2", part_id="P-0042")
        if result.decision == "accept": ...
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

DECISIONS = ("accept", "reject", "review")
RETRYABLE = {502, 503, 504}


@dataclass(frozen=True)
class LineResult:
    """What the line acts on; `fail_safe` is True when the decision is review because the service failed."""

    decision: str
    defect_type: str | None = None
    confidence: float | None = None
    model_version: str | None = None
    request_id: str | None = None
    latency_ms: float = 0.0
    fail_safe: bool = False
    reason: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)


class LineClient:
    """A small synchronous client with a total deadline per part and the review fail-safe."""

    def __init__(self, url: str = "http://127.0.0.1:3000", timeout_s: float = 2.0, connect_timeout_s: float = 0.5,
                 retries: int = 1, retry_backoff_s: float = 0.05) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=self.connect_timeout_s))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def is_ready(self) -> bool:
        """True when the service answers /readyz with 200 within the connect timeout."""
        import httpx

        try:
            return self._http.get(f"{self.url}/readyz", timeout=self.connect_timeout_s * 2).status_code == 200
        except httpx.HTTPError:
            return False

    def classify(self, image: bytes | Path, filename: str | None = None, line: str | None = None,
                 camera: str | None = None, part_id: str | None = None) -> LineResult:
        """The service's decision for one part, or `review` (fail_safe) when it cannot give one in time."""
        import httpx

        started = time.perf_counter()
        try:
            raw = image.read_bytes() if isinstance(image, Path) else bytes(image)
        except OSError as exc:
            return self._fail_safe(started, f"cannot read the image ({exc})")
        name = filename or (image.name if isinstance(image, Path) else "part.jpg")
        data = {k: v for k, v in {"line": line, "camera": camera, "part_id": part_id}.items() if v is not None}
        reason = ""
        for attempt in range(self.retries + 1):
            left = self.timeout_s - (time.perf_counter() - started)
            if left <= 0:
                reason = reason or "deadline passed"
                break
            try:
                response = self._http.post(f"{self.url}/predict", files={"image": (name, raw)}, data=data,
                                           timeout=httpx.Timeout(left, connect=min(self.connect_timeout_s, left)))
            except httpx.TimeoutException:
                reason = f"no answer within {self.timeout_s} s"
                break
            except httpx.HTTPError as exc:
                reason = f"service unreachable ({type(exc).__name__})"
                if attempt < self.retries:
                    time.sleep(min(self.retry_backoff_s, max(0.0, left - 0.01)))
                continue
            if response.status_code in RETRYABLE:
                reason = f"service busy (HTTP {response.status_code})"
                if attempt < self.retries:
                    time.sleep(min(self.retry_backoff_s, max(0.0, left - 0.01)))
                continue
            return self._parse(response, started, part_id)
        return self._fail_safe(started, reason, part_id)

    def _parse(self, response: Any, started: float, part_id: str | None) -> LineResult:
        if response.status_code != 200:
            try:
                detail = response.json().get("error", "")
            except ValueError:
                detail = response.text[:200]
            return self._fail_safe(started, f"HTTP {response.status_code}: {detail}", part_id)
        try:
            body = response.json()
            decision = body["decision"]
            if decision not in DECISIONS:
                raise ValueError(f"unknown decision {decision!r}")
            return LineResult(decision=decision, defect_type=str(body["defect_type"]),
                              confidence=float(body["confidence"]), model_version=body.get("model_version"),
                              request_id=body.get("request_id"), latency_ms=self._ms(started),
                              probabilities=dict(body.get("probabilities") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._fail_safe(started, f"malformed answer ({exc})", part_id)

    def _fail_safe(self, started: float, reason: str, part_id: str | None = None) -> LineResult:
        log.warning("part %s routed to review: %s", part_id or "?", reason)
        return LineResult(decision="review", latency_ms=self._ms(started), fail_safe=True, reason=reason)

    @staticmethod
    def _ms(started: float) -> float:
        return round((time.perf_counter() - started) * 1000, 2)
