"""The real service (`defectops serve` -> `bentoml serve` on 127.0.0.1) with the tiny model: every endpoint,
the decisions, /metrics, the production log, the review queue, bad input and the line client."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from components.data.images import decode, image_stats
from components.serving.client import LineClient
from components.serving.predlog import COMPACT_DIMS, read_log
from components.serving.review import pending_items
from tests.serving.conftest import MAX_PIXELS, PROBES, THRESHOLD, probe_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAGNETIC_TILE_LIKE = (120, 90)


def post(server, path: str, files, data: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", files=files, data=data, timeout=60, **kwargs)


def predict(server, kind: str, **data: str) -> dict:
    response = post(server, "/predict", {"image": (f"{kind}.png", probe_png(kind), "image/png")}, data)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_log(server, request_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in read_log(server.settings.prod_log_dir).records:
            if record["request_id"] == request_id:
                return record
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} not in the production log after {timeout} s")


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def assert_still_serving(server) -> None:
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert predict(server, "dark")["decision"] == "accept"


# ------------------------------------------------------------------ endpoints and decisions


def test_health_endpoints(server) -> None:
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize("kind", list(PROBES))
def test_predict_gives_the_expected_decision(server, kind: str) -> None:
    expected_class, expected_decision = PROBES[kind]
    body = predict(server, kind)
    assert set(body) >= {"request_id", "defect_type", "confidence", "probabilities", "decision", "model_version",
                         "latency_ms"}
    assert body["decision"] == expected_decision
    if expected_class:
        assert body["defect_type"] == expected_class
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    auto = body["confidence"] >= THRESHOLD
    assert body["decision"] == ("review" if not auto else "accept" if body["defect_type"] == "normal" else "reject")
    assert body["model_version"].startswith("file:") and body["model_version"].endswith("model.pt")
    assert body["latency_ms"] > 0 and len(body["request_id"]) == 32


def test_predict_batch_returns_one_result_per_image_in_order(server) -> None:
    kinds = ["bright", "dark", "mixed", "dark"]
    files = [("images", (f"{k}.png", probe_png(k), "image/png")) for k in kinds]
    response = post(server, "/predict_batch", files, {"line": "L2"})
    assert response.status_code == 200, response.text
    results = response.json()
    assert [r["decision"] for r in results] == [PROBES[k][1] for k in kinds]
    assert len({r["request_id"] for r in results}) == len(kinds)


def test_explain_returns_a_png_overlay_and_the_prediction(server) -> None:
    response = post(server, "/explain", {"image": ("bright.png", probe_png("bright"), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["defect_type"] == "dent" and body["decision"] == "reject" and body["explained_class"] == "dent"
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (64, 64) and overlay.mode == "RGB"


# ------------------------------------------------------------------ log, review queue, metrics


def test_every_prediction_is_logged_with_stats_embedding_and_metadata(server) -> None:
    body = predict(server, "bright", line="L1", camera="C3", part_id="P-0042")
    record = wait_for_log(server, body["request_id"])
    assert record["model_version"] == body["model_version"] and record["decision"] == "reject"
    assert record["defect_type"] == "dent" and record["confidence"] == pytest.approx(body["confidence"])
    assert record["metadata"] == {"line": "L1", "camera": "C3", "part_id": "P-0042"}
    assert len(record["embedding"]) == COMPACT_DIMS and any(v != 0 for v in record["embedding"])
    stats = image_stats(decode(probe_png("bright")).rgb)
    for key, value in stats.items():
        assert record[key] == pytest.approx(value)
    assert (record["width"], record["height"], record["mode"]) == (64, 64, "RGB")
    assert record["latency_ms"] == body["latency_ms"] and record["timestamp"].endswith("+00:00")


def test_review_and_audit_images_are_kept(server) -> None:
    review = predict(server, "mixed")
    audited = predict(server, "dark")  # audit_sample_rate is 1.0 in the test params
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        items = {i.request_id: i for i in pending_items(server.settings.review_queue_dir)}
        if review["request_id"] in items and audited["request_id"] in items:
            break
        time.sleep(0.1)
    item = items[review["request_id"]]
    assert item.data["reason"] == "review" and item.data["decision"] == "review"
    assert item.image_path.read_bytes() == probe_png("mixed") and item.image_path.suffix == ".png"
    assert items[audited["request_id"]].data["reason"] == "audit"


def test_metrics_count_defects_decisions_confidence_latency_and_model(server) -> None:
    for kind in PROBES:
        predict(server, kind)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'defects_detected_total{defect_type="dent"}' in text
    assert 'defects_detected_total{defect_type="normal"}' not in text
    for decision in ("accept", "reject", "review"):
        assert f'decisions_total{{decision="{decision}"}}' in text
    assert "prediction_confidence_bucket" in text and "inference_latency_seconds_bucket" in text
    assert "inference_batch_size_bucket" in text
    served = [line for line in text.splitlines() if line.startswith("served_model_info{")]
    assert served and 'fast_path="onnxruntime"' in served[0] and "model.pt" in served[0]
    assert "bentoml_service_request_total" in text


# ------------------------------------------------------------------ bad input


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(5)
    full = image_bytes(Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)), "JPEG")
    return full[: len(full) // 2]


BAD_INPUTS = {
    "not an image": (lambda: {"files": {"image": ("part.jpg", b"this is not a picture", "image/jpeg")}}, 422,
                     "not an image"),
    "truncated jpeg": (lambda: {"files": {"image": ("part.jpg", _truncated_jpeg(), "image/jpeg")}}, 422,
                       "truncated"),
    "empty file": (lambda: {"files": {"image": ("part.jpg", b"", "image/jpeg")}}, 422, "empty file"),
    "empty body": (lambda: {"content": b""}, 400, "empty request body"),
    "missing field": (lambda: {"files": {"photo": ("part.png", probe_png("dark"), "image/png")}}, 400,
                      "missing field 'image'"),
    "text instead of file": (lambda: {"data": {"image": "http://127.0.0.1:1/x.jpg"}, "files": {"x": ("a", b"b")}},
                             400, "must be a file upload"),
    "json body": (lambda: {"json": {"image": "part.jpg"}}, 415, "multipart/form-data"),
    "over the pixel limit": (lambda: {"files": {"image": ("big.png", image_bytes(Image.new("L", (1100, 1000), 9),
                                                                                   "PNG"), "image/png")}},
                             422, f"exceeds the limit of {MAX_PIXELS}"),
    "very large upload": (lambda: {"files": {"image": ("huge.jpg", b"\xff\xd8" + b"\0" * 3_100_000, "image/jpeg")}},
                          413, "byte limit"),
    "long metadata": (lambda: {"files": {"image": ("p.png", probe_png("dark"), "image/png")},
                               "data": {"part_id": "x" * 500}}, 400, "part_id: longer than"),
    "no multipart boundary": (lambda: {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400,
                              "malformed multipart body"),
    "body without its boundary": (lambda: {"content": b"abc", "headers": {
        "content-type": "multipart/form-data; boundary=zzz"}}, 400, "malformed multipart body"),
    "over 1000 parts": (lambda: {"data": {f"f{i}": "x" for i in range(1001)},
                                 "files": {"image": ("p.png", probe_png("dark"), "image/png")}}, 413,
                        "1002 multipart parts is over the limit of 1000"),
    "blank frame": (lambda: {"files": {"image": ("cap.png", image_bytes(Image.new("L", MAGNETIC_TILE_LIKE, 3), "PNG"),
                                                 "image/png")}}, 422, "a blank frame (contrast 0.00 is below"),
    "a sliver": (lambda: {"files": {"image": ("line.png", image_bytes(Image.fromarray(
        np.random.default_rng(3).integers(0, 255, (1, 4000), dtype=np.uint8)), "PNG"), "image/png")}}, 422,
                 "4000x1 px is below the smallest frame"),
    "two images": (lambda: {"files": [("image", ("a.png", probe_png("dark"), "image/png")),
                                      ("image", ("b.png", probe_png("bright"), "image/png"))]}, 400,
                   "2 parts named 'image'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_4xx_and_the_service_stays_up(server, case: str) -> None:
    build, status, message = BAD_INPUTS[case]
    response = httpx.post(f"{server.url}/predict", timeout=60, **build())
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert_still_serving(server)
    assert _settled_skipped(server) == 0


def _settled_skipped(server, timeout: float = 10.0) -> int:
    """Lines of the production log read as torn or invalid, once any being appended is complete: the service
    writes its log in the background, so a read can meet the last record half-written; a bad line stays bad."""
    deadline = time.monotonic() + timeout
    while (skipped := read_log(server.settings.prod_log_dir).skipped) and time.monotonic() < deadline:
        time.sleep(0.1)
    return skipped


def _bad_requests(server, reason: str) -> float:
    prefix = f'bad_requests_total{{reason="{reason}"}} '
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return next((float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def _multipart(header_end: bytes = b"\r\n\r\n") -> bytes:
    return (b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"' + header_end
            + probe_png("dark") + b"\r\n--B--\r\n")


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=B", "Multipart/Form-Data; boundary=B"])
def test_a_body_that_does_not_parse_is_a_counted_400_not_a_500(server, content_type: str) -> None:
    """A part whose headers no blank line ends: the form parser BentoML runs would fail, answered as a 500."""
    before, log_start = _bad_requests(server, "bad_multipart"), len(server.log_text())
    response = httpx.post(f"{server.url}/predict", content=_multipart(header_end=b"\r\n"),
                          headers={"content-type": content_type}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith("malformed multipart body (invalid multipart data); ") and "\n" not in error
    assert _bad_requests(server, "bad_multipart") == before + 1
    assert "Traceback" not in server.log_text()[log_start:]
    assert_still_serving(server)


def test_the_media_type_is_matched_in_any_case(server) -> None:
    """Media types are case-insensitive; BentoML matches `multipart/form-data` exactly, so the guard forwards it
    lowercased instead of letting BentoML read the body as JSON."""
    response = httpx.post(f"{server.url}/predict", content=_multipart(),
                          headers={"content-type": "Multipart/Form-Data; boundary=B"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["decision"] == "accept"


def test_a_get_on_predict_says_to_post(server) -> None:
    response = httpx.get(f"{server.url}/predict", timeout=30)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "POST the image as multipart/form-data field 'image'" in response.json()["error"]


def test_a_bad_image_in_a_batch_names_its_index_and_nothing_of_it_is_logged(server) -> None:
    files = [("images", ("a.png", probe_png("dark"), "image/png")), ("images", ("b.jpg", b"nope", "image/jpeg"))]
    response = post(server, "/predict_batch", files)
    assert response.status_code == 422 and response.json()["error"].startswith("images[1]: not an image")
    batch_id = response.json()["request_id"]
    wait_for_log(server, predict(server, "dark")["request_id"])  # written in order: the batch's lines come first
    assert not [r for r in read_log(server.settings.prod_log_dir).records if r["request_id"].startswith(batch_id)]


def test_a_batch_over_the_pixel_budget_is_refused_before_decoding(server) -> None:
    """Each frame is under data.max_image_pixels, but together they are over serve.max_batch_pixels (1 MP here)."""
    noise = np.random.default_rng(5).integers(0, 255, (600, 1000), dtype=np.uint8)
    frame = image_bytes(Image.fromarray(noise), "PNG")
    response = post(server, "/predict_batch", [("images", (f"{i}.png", frame, "image/png")) for i in range(2)])
    assert response.status_code == 413, response.text
    assert response.json()["error"] == ("2 images of 1.2 megapixels in all is over the limit of 1 "
                                        "(serve.max_batch_pixels); split the request")
    one = post(server, "/predict_batch", [("images", ("0.png", frame, "image/png"))])
    assert one.status_code == 200 and len(one.json()) == 1, one.text
    batch_id = response.json()["request_id"]
    assert not [r for r in read_log(server.settings.prod_log_dir).records if r["request_id"].startswith(batch_id)]


def test_chunked_upload_over_the_limit_is_refused(server) -> None:
    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    response = httpx.post(f"{server.url}/predict", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413 and "byte limit" in response.json()["error"]
    assert_still_serving(server)


def _textured(mode: str) -> Image.Image:
    """A noisy picture in `mode` (a uniform one would be refused as a blank frame)."""
    width, height = MAGNETIC_TILE_LIKE
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        image.putalpha(128)
        return image
    return image.convert(mode)


def _palette_with_transparency() -> bytes:
    image = _textured("P")
    image.info["transparency"] = 0
    return image_bytes(image, "PNG")


UNUSUAL_IMAGES = {
    "16-bit grayscale": (lambda: image_bytes(Image.fromarray(
        np.random.default_rng(1).integers(0, 65535, (90, 120)).astype(np.uint16)), "PNG"), "I;16"),
    "RGBA": (lambda: image_bytes(_textured("RGBA"), "PNG"), "RGBA"),
    "CMYK": (lambda: image_bytes(_textured("CMYK"), "JPEG"), "CMYK"),
    "palette": (lambda: image_bytes(_textured("P"), "PNG"), "P"),
    "palette + transparency": (_palette_with_transparency, "P"),
}


@pytest.mark.parametrize("case", list(UNUSUAL_IMAGES))
def test_unusual_image_modes_are_served_through_the_shared_decode(server, case: str) -> None:
    build, mode = UNUSUAL_IMAGES[case]
    response = post(server, "/predict", {"image": ("part.png", build(), "image/png")})
    assert response.status_code == 200, response.text
    record = wait_for_log(server, response.json()["request_id"])
    assert record["mode"].startswith(mode) and (record["width"], record["height"]) == MAGNETIC_TILE_LIKE


# ------------------------------------------------------------------ the line client


def test_line_client_passes_the_service_decision_through(server) -> None:
    with LineClient(server.url, timeout_s=30) as client:
        assert client.is_ready()
        result = client.classify(probe_png("bright"), filename="p.png", line="L1", part_id="P-1")
    assert (result.decision, result.defect_type, result.fail_safe) == ("reject", "dent", False)
    assert result.model_version and result.request_id


def test_line_client_routes_a_refused_image_to_review(server) -> None:
    with LineClient(server.url, timeout_s=30) as client:
        result = client.classify(b"not an image", filename="p.jpg")
    assert result.decision == "review" and result.fail_safe and "HTTP 422" in result.reason
