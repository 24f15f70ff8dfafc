"""The BentoML service: one pinned model version, adaptive batching, a fast path with parity, logs off the hot path.

Start it with `defectops serve` (which pins the approved champion when there is no deployment record yet)
or, with a record in place, `bentoml serve components.serving.service:DefectClassifier`. Endpoints:

    POST /predict        multipart `image` (+ optional `line`, `camera`, `part_id`) -> one result
    POST /predict_batch  multipart `images` repeated (+ the same metadata) -> one result per image, in order
    POST /explain        like /predict, plus a Grad-CAM overlay (PNG, base64) of the predicted class
    GET  /livez /readyz /metrics

A result: request_id, defect_type, confidence, probabilities, decision (accept/reject/review by the
deployed threshold), model_version, latency_ms. Bad input gets a 4xx with {"error": ...}; the service and
the production log are unaffected.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import bentoml

from components.serving import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

PREDICTION_PATHS = {"/predict": "image", "/predict_batch": "images", "/explain": "image"}
MAX_METADATA_CHARS = 200
REQUEST_TIMEOUT_S = 120  # BentoML ends a request after this; a swapped-out model waits as long for its requests
EXPLAIN_MAX_SIDE = 1024
# a 1x1 grey PNG: warms the decode path at start
_GREY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                          "3a7e9b550000000a49444154789c6368000000820081dd4394b60000000049454e44ae426082")


class BadMetadata(ValueError):
    """A metadata field (line, camera, part_id) is unusable."""


def _json_response(status: int, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": message}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


def _part_headers(body: bytes, field: str) -> list[bytes]:
    """The Content-Disposition header lines of the multipart parts named `field` (a plain scan, no parsing)."""
    needle, lines, start = f'name="{field}"'.encode(), [], 0
    while (found := body.find(needle, start)) >= 0:
        line_start = body.rfind(b"\n", 0, found) + 1
        line_end = body.find(b"\r\n", found)
        line = body[line_start: line_end if line_end >= 0 else len(body)]
        if line.lower().startswith(b"content-disposition:") and body[found - 1: found] in (b" ", b";"):
            lines.append(line)  # `name=`, not the tail of `filename=`
        start = found + len(needle)
    return lines


MAX_MULTIPART_PARTS = 1000  # Starlette's own limit; beyond it the form parser fails as a 500


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary named in a Content-Type header, None when there is none."""
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    return None


def _lowercase_media_type(content_type: bytes) -> bytes:
    """The header with its media type lowercased, parameters untouched: BentoML picks its parser by an exact,
    case-sensitive match, and parses a `Multipart/Form-Data` body as JSON."""
    media_type, sep, rest = content_type.partition(b";")
    return media_type.strip().lower() + sep + rest


async def multipart_problem(body: bytes, content_type: bytes) -> str | None:
    """Why Starlette's form parser, the one BentoML runs next, refuses the body (None when it parses): its
    refusal would reach the client as a 500."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> Any:
        yield body

    parser = MultiPartParser(Headers(raw=[(b"content-type", content_type)]), stream(), max_files=MAX_MULTIPART_PARTS,
                             max_fields=MAX_MULTIPART_PARTS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # "Invalid multipart data.", "Part exceeded maximum size of 1024KB.", ...
        return exc.message[:1].lower() + exc.message[1:].rstrip(".")
    await form.close()
    return None


def frame_problem(facts: dict[str, Any], limits: Any) -> str | None:
    """Why a frame is refused (None when it is not): what no camera frame of a part looks like, by the `validate`
    bounds every training image met: a sliver or a thumbnail, and a blank frame (a lens cap, a dead lamp).
    Served, such a frame is classified with confidence like any other, and may be accepted; refused, the line
    client sends the part to review."""
    width, height = facts["width"], facts["height"]
    if (limits.width.min is not None and width < limits.width.min) or \
            (limits.height.min is not None and height < limits.height.min):
        smallest = "x".join("any" if bound is None else f"{bound:g}" for bound in (limits.width.min, limits.height.min))
        return (f"{width}x{height} px is below the smallest frame the data contract allows ({smallest}, "
                "validate.width/height.min); send the camera's whole frame")
    if limits.contrast.min is not None and facts["contrast"] < limits.contrast.min:
        return (f"a blank frame (contrast {facts['contrast']:.2f} is below validate.contrast.min "
                f"{limits.contrast.min:g}); check the camera: lens, lamp, exposure")
    return None


async def all_or_nothing(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await them side by side; the first error is raised only once every one has ended, so that no answer of
    a request that fails is still being recorded when the caller learns it failed."""
    import asyncio

    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class ExplainerCache:
    """The Grad-CAM explainer (a private fp32 copy of the model) of the deployment being served. One built for a
    swapped-out deployment, by an /explain that started before the swap, serves its request only: kept, it would
    hold a copy of the old model for the life of the process."""

    def __init__(self, current: Callable[[], Any]) -> None:
        import threading

        self._current = current  # the service's deployment now
        self._lock = threading.Lock()
        self._cached: tuple[Any, Any] | None = None  # (deployment, explainer)

    def get(self, deployment: Any) -> Any:
        """`deployment`'s explainer; kept for the next request only while `deployment` is the one served."""
        from components.serving.explain import GradCamExplainer

        with self._lock:
            cached = self._cached
        if cached is not None and cached[0] is deployment:
            return cached[1]
        explainer = GradCamExplainer(deployment.reference.model, deployment.reference.device)
        with self._lock:  # a swap sets the new deployment before `clear`, so the old one is never kept
            if deployment is self._current():
                self._cached = (deployment, explainer)
        return explainer

    def clear(self) -> None:
        """Forget the explainer of a swapped-out deployment (call after the new one is current)."""
        with self._lock:
            self._cached = None


class UploadGuard:
    """ASGI middleware in front of the prediction endpoints: refuses, with a clear 4xx, what is not an upload.

    Reads the body (at most serve.max_upload_bytes: 413 beyond), then requires multipart/form-data (415) that
    parses, with the image field present as a file (400). This also keeps BentoML from fetching a URL sent as text.
    """

    def __init__(self, app: Any) -> None:
        from components.config import get_settings
        from components.errors import DefectOpsError
        from components.serving.params import load_serve_params

        self.app = app
        try:
            self.max_bytes = load_serve_params(get_settings().params_file)[0].max_upload_bytes
        except (DefectOpsError, OSError, ValueError):  # the service itself reports bad params
            self.max_bytes = 20_000_000
            log.warning("upload guard: params.yaml unreadable, using a %d byte limit", self.max_bytes)

    async def _refuse(self, send: Any, status: int, message: str, reason: str,
                      headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        metrics.BAD_REQUESTS.labels(reason).inc()
        start, body = _json_response(status, message)
        start["headers"].extend(headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, or None once it exceeds the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        field = PREDICTION_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if field is None:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await self._refuse(send, 405, f"{scope.get('method')} is not accepted on {scope['path']}; POST the "
                               f"image as multipart/form-data field '{field}'", "wrong_method", ((b"allow", b"POST"),))
            return
        headers = dict(scope.get("headers") or [])
        length, chunked = headers.get(b"content-length"), b"chunked" in headers.get(b"transfer-encoding", b"")
        how = f"send the image as multipart/form-data file field '{field}' (curl -F {field}=@part.jpg)"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, 413, f"request body of {int(length)} bytes is over the {self.max_bytes} byte "
                               "limit (serve.max_upload_bytes); send a smaller image", "too_large")
            return
        if not chunked and (length is None or length == b"0"):
            await self._refuse(send, 400, f"empty request body; {how}", "empty_body")
            return
        given_type = headers.get(b"content-type", b"none")
        raw_type = _lowercase_media_type(given_type)
        content_type = raw_type.decode(errors="replace")
        if not content_type.startswith("multipart/form-data"):
            await self._refuse(send, 415, f"content type {given_type.decode(errors='replace')} is not accepted; {how}",
                               "not_multipart")
            return
        body = await self._read_body(receive)
        if body is None:
            await self._refuse(send, 413, f"request body over the {self.max_bytes} byte limit "
                               "(serve.max_upload_bytes); send a smaller image", "too_large")
            return
        boundary = _boundary(content_type)
        n_parts = body.count(b"--" + boundary) - 1 if boundary else 0  # the closing delimiter matches too
        if n_parts < 1:
            await self._refuse(send, 400, "malformed multipart body (no boundary, or the body does not use it); "
                               f"{how}", "bad_multipart")
            return
        if n_parts > MAX_MULTIPART_PARTS:
            await self._refuse(send, 413, f"{n_parts} multipart parts is over the limit of {MAX_MULTIPART_PARTS}; "
                               "split the request", "too_many_parts")
            return
        if problem := await multipart_problem(body, raw_type):
            await self._refuse(send, 400, f"malformed multipart body ({problem}); {how}", "bad_multipart")
            return
        parts = _part_headers(body, field)
        if len(parts) > 1 and field == "image":
            await self._refuse(send, 400, f"{len(parts)} parts named 'image': send one image per request, or "
                               "several to /predict_batch as field 'images'", "several_images")
            return
        if not parts:
            await self._refuse(send, 400, f"missing field '{field}'; {how}", "missing_field")
            return
        if not all(b"filename=" in part.lower() for part in parts):
            await self._refuse(send, 400, f"field '{field}' must be a file upload, not text; {how}", "not_a_file")
            return
        scope = {**scope, "headers": [(name, value) for name, value in scope["headers"] if name != b"content-type"]
                 + [(b"content-type", raw_type)]}
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _image_error(field: str, exc: Exception) -> str:
    return f"{field}: {str(exc).removeprefix('upload: ')}"


def _stop_server_if_serving() -> None:
    """Ask the `bentoml serve` parent to shut down, so a refused start ends instead of restarting forever."""
    import os
    import signal

    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "bentoml" in command and " serve" in command:
        os.kill(parent, signal.SIGTERM)


@bentoml.service(resources={"gpu": 1}, workers=1, traffic={"timeout": REQUEST_TIMEOUT_S, "max_concurrency": 256})
class DefectClassifier:
    """Serves the pinned model of the deployment record; delegates all image and model work to the Predictor."""

    def __init__(self) -> None:
        import cv2

        from components.config import get_settings, load_params
        from components.serving.deployment import NothingToServe, read_record, record_path
        from components.serving.params import serve_params
        from components.serving.predlog import BackgroundWriter, PredictionLog
        from components.serving.reload import RecordWatcher, file_stamp, load_deployment
        from components.serving.replicas import ReplicaReport
        from components.serving.review import ReviewQueue

        cv2.setNumThreads(1)  # preprocessing runs in request threads; the engine owns the cores
        settings = get_settings()
        params = load_params(settings.params_file)  # read once: serve, the pixel limit, the data contract
        self.params, self.max_pixels = serve_params(params), params.data.max_image_pixels
        self.frame_limits = params.validate_  # the `validate` bounds, applied to single frames
        path = record_path(settings)
        stamp = file_stamp(path)
        record = read_record(settings)
        if record is None:
            message = (f"nothing approved to serve: no deployment record at {path}; start with "
                       "`defectops serve`, which pins the approved champion, or promote a model")
            log.critical(message)
            _stop_server_if_serving()
            raise NothingToServe(message)

        def load(new_record: Any, new_stamp: Any) -> Any:
            return load_deployment(settings, self.params, new_record, self.max_pixels, new_stamp)

        # the status file goes first, beating while the model loads: a replica that starts during a promotion
        # (a restarted pod) is waited for until it serves the new record, not missed until it has loaded
        self.replica = ReplicaReport(settings, self.params.reload_poll_seconds).start()
        self.replica.loading(record.deployed_at, record.model_version)
        try:
            self.deployment = load(record, stamp)  # each request holds it (`serving()`); a hot swap replaces it
        except Exception as exc:
            self.replica.refused(record.deployed_at, record.model_version, str(exc))
            self.replica.halt()  # the refusal stays readable; the file goes stale as this process ends
            raise
        self.writer = BackgroundWriter(self.params.log_queue_size, on_drop=metrics.LOG_DROPPED.inc,
                                       on_error=metrics.LOG_ERRORS.inc, max_bytes=self.params.log_queue_bytes)
        self.prediction_log = PredictionLog(settings.prod_log_dir, self.writer, self.params.log_retention_days)
        self.review_queue = ReviewQueue(settings.review_queue_dir, self.writer, self.params.review_retention_days,
                                        self.params.audit_sample_rate)
        self._explainers = ExplainerCache(lambda: self.deployment)
        metrics.SERVED_MODEL.labels(*self.deployment.labels).set(1)
        self._prepare(_GREY_PNG, check=False)  # the decode path's imports, before the first request
        self.watcher = RecordWatcher(path, self.deployment, load, self._swap, self.params.reload_poll_seconds,
                                     self.replica).start()  # reports what this replica now serves
        batcher = self.deployment.batcher
        log.info("serving %s (%s on %s, threshold %.4f, batches up to %d, max latency %d ms)",
                 self.deployment.model_version, self.deployment.fast_path, self.deployment.engine.device,
                 record.threshold, batcher.max_batch_size, batcher.max_latency_ms)

    # ------------------------------------------------------------ inference

    def _swap(self, new: Any) -> None:
        """Serve `new` from the next request on; the old model answers the requests holding it, then retires."""
        from components.serving.reload import retire

        old, self.deployment = self.deployment, new
        metrics.SERVED_MODEL.labels(*old.labels).set(0)
        metrics.SERVED_MODEL.labels(*new.labels).set(1)
        self._explainers.clear()
        retire(old, REQUEST_TIMEOUT_S)  # a request holding it (still decoding, queued) ends within this

    def _prepare(self, raw: bytes, deployment: Any = None, check: bool = True) -> tuple[Any, dict[str, Any], Any]:
        """Decode (the shared conversion rule), image statistics, and the input tensor of `deployment`'s model;
        with `check`, a frame outside the data contract is refused (ImageError)."""
        from components.data.images import decode

        decoded = decode(raw, self.max_pixels)
        facts = {**decoded.facts(), "bytes": len(raw)}
        if check and (problem := frame_problem(facts, self.frame_limits)):
            from components.errors import ImageError

            raise ImageError(problem)
        return decoded, facts, (deployment or self.deployment).engine.prepare(decoded.pixels)

    async def _predict_one(self, raw: bytes, suffix: str, metadata: dict[str, str], endpoint: str,
                           request_id: str, started: float, deployment: Any) -> tuple[dict[str, Any], Any, Any]:
        prepared = await self._prepared(raw, deployment)
        return await self._infer(prepared, raw, suffix, metadata, endpoint, request_id, started, deployment)

    async def _prepared(self, raw: bytes, deployment: Any) -> tuple[Any, dict[str, Any], Any]:
        """`_prepare` in a worker thread; an unusable image raises ImageError here, before anything is recorded."""
        import anyio

        return await anyio.to_thread.run_sync(self._prepare, raw, deployment)

    async def _infer(self, prepared: tuple[Any, dict[str, Any], Any], raw: bytes, suffix: str,
                     metadata: dict[str, str], endpoint: str, request_id: str, started: float,
                     deployment: Any) -> tuple[dict[str, Any], Any, Any]:
        """Classify a prepared image and record it (metrics, production log, review queue)."""
        decoded, facts, tensor = prepared
        result, prediction = await self._classify(tensor, request_id, started, deployment)
        self._record(result, prediction, facts, metadata, endpoint, raw, suffix, deployment)
        return result, decoded, tensor

    @staticmethod
    async def _classify(tensor: Any, request_id: str, started: float,
                        deployment: Any) -> tuple[dict[str, Any], Any]:
        """The model's answer for one prepared image (through the adaptive batcher); records nothing."""
        prediction = await deployment.batcher(tensor)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        return {"request_id": request_id, **prediction.as_dict(), "model_version": deployment.model_version,
                "latency_ms": latency_ms}, prediction

    def _record(self, result: dict[str, Any], prediction: Any, facts: dict[str, Any], metadata: dict[str, str],
                endpoint: str, raw: bytes, suffix: str, deployment: Any) -> None:
        """Metrics now; log line and review item through the background writer (never blocks)."""
        from components.serving.predlog import compact_embedding, utc_now_iso

        decision, defect_type = result["decision"], result["defect_type"]
        metrics.DECISIONS.labels(decision).inc()
        metrics.CONFIDENCE.observe(result["confidence"])
        metrics.INFERENCE_LATENCY.observe(result["latency_ms"] / 1000)
        if defect_type != deployment.engine.normal_class:
            metrics.DEFECTS_DETECTED.labels(defect_type).inc()
        stamp = utc_now_iso()
        embedding = [round(float(v), 5) for v in compact_embedding(prediction.embedding)]
        record = {"timestamp": stamp, "request_id": result["request_id"], "endpoint": endpoint,
                  "model_version": deployment.model_version, "fast_path": deployment.fast_path,
                  "defect_type": defect_type, "confidence": result["confidence"], "decision": decision,
                  "threshold": deployment.engine.threshold,
                  "probabilities": result["probabilities"], "latency_ms": result["latency_ms"], **facts,
                  "embedding": embedding, "metadata": metadata}
        if not self.prediction_log.append(record):
            log.warning("prediction log queue full: record %s dropped", result["request_id"])
        reason = self.review_queue.reason(decision, result["request_id"])
        if reason is not None:
            item = {k: v for k, v in record.items() if k != "embedding"}
            if self.review_queue.keep(result["request_id"], raw, suffix, {**item, "reason": reason}):
                metrics.REVIEW_ITEMS.labels(reason).inc()

    # ------------------------------------------------------------ request helpers

    @staticmethod
    def _metadata(line: str | None, camera: str | None, part_id: str | None) -> dict[str, str]:
        values = {"line": line, "camera": camera, "part_id": part_id}
        for key, value in values.items():
            if value is not None and len(str(value)) > MAX_METADATA_CHARS:
                raise BadMetadata(f"{key}: longer than {MAX_METADATA_CHARS} characters; send a shorter id")
        return {k: str(v) for k, v in values.items() if v not in (None, "")}

    @staticmethod
    def _refuse(ctx: bentoml.Context, status: int, message: str, reason: str, request_id: str) -> dict[str, Any]:
        metrics.BAD_REQUESTS.labels(reason).inc()
        ctx.response.status_code = status
        return {"error": message, "request_id": request_id}

    # ------------------------------------------------------------ endpoints

    @bentoml.api
    async def predict(self, image: Path, line: str | None = None, camera: str | None = None,
                      part_id: str | None = None, ctx: bentoml.Context = None) -> dict[str, Any]:
        """Classify one image (multipart field `image`); decision accept / reject / review."""
        from components.errors import ImageError

        started, request_id = time.perf_counter(), uuid.uuid4().hex
        try:
            metadata = self._metadata(line, camera, part_id)
            with self.deployment.serving() as deployment:
                result, _, _ = await self._predict_one(image.read_bytes(), image.suffix, metadata, "predict",
                                                       request_id, started, deployment)
        except ImageError as exc:
            return self._refuse(ctx, 422, _image_error("image", exc), "bad_image", request_id)
        except BadMetadata as exc:
            return self._refuse(ctx, 400, str(exc), "bad_metadata", request_id)
        return result

    @bentoml.api
    async def predict_batch(self, images: list[Path], line: str | None = None, camera: str | None = None,
                            part_id: str | None = None,
                            ctx: bentoml.Context = None) -> list[dict[str, Any]] | dict[str, Any]:
        """Classify several images (repeat multipart field `images`); one result per image, in order. One
        unusable image refuses the whole request (422 naming its index): nothing of it is logged."""
        import asyncio

        from components.data.images import header_pixels
        from components.errors import ImageError

        started, batch_id = time.perf_counter(), uuid.uuid4().hex
        if not images:
            return self._refuse(ctx, 400, "no images; repeat multipart field 'images'", "empty_body", batch_id)
        if len(images) > self.params.max_batch_images:
            return self._refuse(ctx, 413, f"{len(images)} images in one request is over the limit of "
                                f"{self.params.max_batch_images} (serve.max_batch_images); split the request",
                                "too_many_images", batch_id)
        try:
            metadata = self._metadata(line, camera, part_id)
        except BadMetadata as exc:
            return self._refuse(ctx, 400, str(exc), "bad_metadata", batch_id)
        raws = [path.read_bytes() for path in images]
        pixels = sum(header_pixels(raw) for raw in raws)
        if pixels > self.params.max_batch_pixels:
            return self._refuse(ctx, 413, f"{len(images)} images of {pixels / 1e6:.1f} megapixels in all is over the "
                                f"limit of {self.params.max_batch_pixels / 1e6:g} (serve.max_batch_pixels); split "
                                "the request", "too_many_pixels", batch_id)
        with self.deployment.serving() as deployment:  # every image of one request on the same model
            # all or nothing: every image is decoded before any is classified, so a bad one refuses the request
            # with no result, log line or review item for the others
            prepared = await asyncio.gather(*(self._prepared(raw, deployment) for raw in raws),
                                            return_exceptions=True)
            failed = [(i, p) for i, p in enumerate(prepared) if isinstance(p, BaseException)]
            for index, error in failed:
                if isinstance(error, ImageError):
                    return self._refuse(ctx, 422, _image_error(f"images[{index}]", error), "bad_image", batch_id)
            if failed:
                raise failed[0][1]
            # and every image is classified before any is recorded: an image the model cannot answer in time
            # (503) fails the request, which the line retries, so the others must leave no record either
            answers = await all_or_nothing(self._classify(ready[2], f"{batch_id}-{i}", started, deployment)
                                           for i, ready in enumerate(prepared))
            for i, ((result, prediction), (_, facts, _), raw, path) in enumerate(
                    zip(answers, prepared, raws, images, strict=True)):
                self._record(result, prediction, facts, {**metadata, "batch_id": batch_id, "batch_index": str(i)},
                             "predict_batch", raw, path.suffix, deployment)
        return [result for result, _ in answers]

    @bentoml.api
    async def explain(self, image: Path, line: str | None = None, camera: str | None = None,
                      part_id: str | None = None, ctx: bentoml.Context = None) -> dict[str, Any]:
        """Classify one image and return a Grad-CAM overlay (PNG, base64) of the predicted class."""
        import anyio

        from components.errors import ImageError

        started, request_id = time.perf_counter(), uuid.uuid4().hex
        with self.deployment.serving() as deployment:
            try:
                metadata = self._metadata(line, camera, part_id)
                result, decoded, tensor = await self._predict_one(image.read_bytes(), image.suffix, metadata,
                                                                  "explain", request_id, started, deployment)
            except ImageError as exc:
                return self._refuse(ctx, 422, _image_error("image", exc), "bad_image", request_id)
            except BadMetadata as exc:
                return self._refuse(ctx, 400, str(exc), "bad_metadata", request_id)
            target = deployment.engine.classes.index(result["defect_type"])
            png = await anyio.to_thread.run_sync(self._overlay_png, decoded.rgb, tensor, target, deployment)
        return {**result, "explained_class": result["defect_type"], "overlay_png_base64": png,
                "explain_ms": round((time.perf_counter() - started) * 1000 - result["latency_ms"], 2)}

    def _overlay_png(self, rgb: Any, tensor: Any, target: int, deployment: Any) -> str:
        """Grad-CAM of class `target` on the fp32 model, laid over the (downscaled) original image, as base64 PNG."""
        return self._explainers.get(deployment).overlay_base64(rgb, tensor, target, EXPLAIN_MAX_SIDE)

    # ------------------------------------------------------------ lifecycle

    def __is_alive__(self) -> bool:
        """False once every inference thread has died, which only a restart mends (Kubernetes' liveness probe)."""
        return not self.deployment.batcher.stopped

    def __is_ready__(self) -> bool:
        return self.writer.alive and not self.deployment.batcher.stopped

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        """Write what is queued before the process ends; promotion stops waiting for this replica."""
        self.replica.stop()
        self.watcher.stop()
        self.deployment.batcher.shutdown()
        self.writer.close()


DefectClassifier.add_asgi_middleware(UploadGuard)
for _api in DefectClassifier.apis.values():
    # every answer is JSON; left unset, BentoML derives that from the output type's JSON schema, rebuilt for
    # every response: 1.1 of the event loop's 4.3 CPU-ms per request under load on the 2-core EPYC
    _api.output_spec.media_type = "application/json"
