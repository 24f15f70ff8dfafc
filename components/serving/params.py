"""Typed `serve` section of params.yaml: batching per device, fast path and parity bounds, logs and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from components.config import Params
from components.errors import UsageError

FastPath = Literal["auto", "openvino", "onnxruntime", "bf16", "fp16", "fp32"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingParams(_Section):
    """Adaptive batching (components/serving/batching.py) for one kind of device."""

    max_batch_size: int = Field(8, ge=1, le=512, description="most images in one forward pass (of one engine "
                                "stream: OpenVINO on CPU runs a batch per stream, side by side)")
    max_latency_ms: int = Field(
        30_000, ge=10, description="a queued image is refused with 503 once it would wait longer; on CPU keep it "
        "well above the compute time of one full batch, or requests get 503 under load")


class ParityParams(_Section):
    """How close the fast inference path must stay to the fp32 PyTorch model on real images."""

    min_top1_agreement: float = Field(0.995, gt=0, le=1, description="share of images with the same top-1 class")
    min_decision_agreement: float = Field(0.995, gt=0, le=1, description="share of images with the same accept / "
                                          "reject / review decision at the model's threshold")
    max_prob_diff: float = Field(0.05, gt=0, le=1, description="largest absolute difference of any calibrated "
                                 "class probability on any image")
    images: int = Field(300, ge=10, description="real images to compare on (a fixed, seeded sample)")


class ServeParams(_Section):
    """Everything the serving side reads from params.yaml."""

    port: int = Field(3000, ge=1, le=65535)
    batching: dict[Literal["cpu", "cuda"], BatchingParams] = {
        "cpu": BatchingParams(max_batch_size=8, max_latency_ms=30_000),
        "cuda": BatchingParams(max_batch_size=32, max_latency_ms=500),
    }
    fast_path: FastPath = Field("auto", description="auto = fp16 on CUDA, OpenVINO on CPU")
    parity: ParityParams = ParityParams()
    audit_sample_rate: float = Field(0.01, ge=0, le=1, description="share of auto-decided parts kept for review")
    log_retention_days: int = Field(90, ge=1, description="production-log files older than this are deleted")
    review_retention_days: int = Field(30, ge=1, description="review-queue days older than this are deleted")
    max_upload_bytes: int = Field(20_000_000, ge=1_000, description="larger request bodies get 413")
    max_batch_images: int = Field(32, ge=1, description="most images in one /predict_batch request")
    max_batch_pixels: int = Field(
        100_000_000, ge=1_000_000, description="most pixels (width x height, read from the headers before "
        "decoding) in one /predict_batch request: 32 images of up to data.max_image_pixels each would hold "
        "gigabytes decoded at once"
    )
    log_queue_size: int = Field(10_000, ge=10, description="pending log/review writes; beyond it they are dropped "
                                "(counted in prediction_log_dropped_total), never blocking a request")
    log_queue_bytes: int = Field(512 * 2**20, ge=2**20, description="bytes the pending review items may hold (each "
                                 "its upload); beyond it they are dropped and counted too, so a stalled disk never "
                                 "fills the memory with pictures")
    reload_poll_seconds: float = Field(2.0, gt=0, description="how often the service looks for a rewritten "
                                       "deployment record (promotion) to hot-swap onto")
    promotion_timeout_seconds: float = Field(300.0, gt=0, description="how long promotion waits for the running "
                                             "service to report the new version (loading + warm-up)")

    def batching_for(self, device: str) -> BatchingParams:
        """The batching settings for 'cpu' or 'cuda' (CPU's when the device has none)."""
        kind = "cuda" if device.startswith("cuda") else "cpu"
        return self.batching.get(kind) or self.batching.get("cpu") or BatchingParams()


def serve_params(raw: Params | dict[str, Any] | None) -> ServeParams:
    """The validated `serve` section (defaults where it is missing)."""
    if isinstance(raw, Params):
        value = (raw.model_extra or {}).get("serve")
    elif isinstance(raw, dict):
        value = raw.get("serve")
    else:
        value = None
    try:
        return ServeParams.model_validate(value or {})
    except ValueError as exc:
        lines = str(exc).splitlines()
        detail = " ".join(line.strip() for line in lines[1:3]) or lines[0]
        raise UsageError(f"params.yaml `serve`: {detail}; fix that key (see components/serving/params.py)") from exc


def load_serve_params(params_file: Path) -> tuple[ServeParams, int]:
    """`serve` params and data.max_image_pixels from a params.yaml (the service reads both)."""
    from components.config import load_params

    params = load_params(params_file)
    return serve_params(params), params.data.max_image_pixels
