"""The line client's fail-safe: a part is never auto-decided when the service is down, slow or wrong."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from components.serving.client import LineClient
from tests.serving.conftest import free_port


class _FakeService(http.server.BaseHTTPRequestHandler):
    """Answers /predict as the class attribute `mode` says: ok, slow, error, busy, weird or garbage."""

    mode = "ok"
    calls = 0

    def log_message(self, *_args: object) -> None:
        pass

    def do_POST(self) -> None:
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        mode = type(self).mode
        if mode == "slow":
            time.sleep(1.5)
        status, body = {
            "ok": (200, {"decision": "accept", "defect_type": "normal", "confidence": 0.99, "model_version": "v1"}),
            "slow": (200, {"decision": "accept", "defect_type": "normal", "confidence": 0.99}),
            "error": (500, {"error": "An unexpected error has occurred"}),
            "busy": (503, {"error": "overloaded"}),
            "weird": (200, {"decision": "ship-it", "defect_type": "normal", "confidence": 0.99}),
            "garbage": (200, None),
        }[mode]
        payload = b"<html>" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fake_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _FakeService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeService.calls = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_service_down_means_review() -> None:
    with LineClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0) as client:
        started = time.perf_counter()
        result = client.classify(b"\xff\xd8jpeg", part_id="P-7")
    assert result.decision == "review" and result.fail_safe and "unreachable" in result.reason
    assert time.perf_counter() - started < 1.5


def test_a_slow_service_means_review_within_the_deadline(fake_service: str) -> None:
    _FakeService.mode = "slow"
    with LineClient(fake_service, timeout_s=0.5) as client:
        started = time.perf_counter()
        result = client.classify(b"jpeg")
    assert result.decision == "review" and result.fail_safe and "no answer within" in result.reason
    assert time.perf_counter() - started < 1.2


@pytest.mark.parametrize(("mode", "reason"), [("error", "HTTP 500"), ("busy", "busy (HTTP 503)"),
                                              ("weird", "unknown decision"), ("garbage", "malformed")])
def test_errors_and_nonsense_mean_review(fake_service: str, mode: str, reason: str) -> None:
    _FakeService.mode = mode
    with LineClient(fake_service, timeout_s=2.0, retries=1) as client:
        result = client.classify(b"jpeg")
    assert result.decision == "review" and result.fail_safe and reason in result.reason
    assert _FakeService.calls == (2 if mode == "busy" else 1), "only 503 is retried"


def test_a_good_answer_passes_through(fake_service: str) -> None:
    _FakeService.mode = "ok"
    with LineClient(fake_service, timeout_s=2.0) as client:
        result = client.classify(b"jpeg", line="L1")
    assert (result.decision, result.defect_type, result.model_version, result.fail_safe) == \
        ("accept", "normal", "v1", False)
