"""Fast inference paths behind the one Predictor: OpenVINO, ONNX Runtime, bf16/fp16 autocast, plain fp32.

Each engine is a Predictor (same decode rule, same eval transform, same temperature and threshold) whose
`forward` runs elsewhere, so switching engines can never change preprocessing or decisions. Measured on the
2-core AVX-512-BF16 CPU of this project (ResNet-50, 224 px, see benchmarks/serve_load.py and the README):
OpenVINO, which runs in bfloat16 on such CPUs, is several times faster than eager fp32 PyTorch; ONNX Runtime
(fp32) about 2x; torch bf16 autocast is no faster at batch 1. On CUDA the fast path is fp16 autocast with
channels_last. `parity.py` decides whether the fast path may be served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import DefectOpsError, UsageError
from components.predictor import Predictor

log = logging.getLogger(__name__)

ENGINES = ("openvino", "onnxruntime", "bf16", "fp16", "fp32")
REFERENCE = "fp32"

_openvino_core: Any = None
_openvino_core_lock = threading.Lock()


def openvino_core() -> Any:
    """The process's one OpenVINO Core, made on first use and kept to the end.

    Every Core loads a CPU plugin of its own, and each plugin swaps the calling thread's alternate signal
    stack for one it unmaps when it is destroyed, restoring the stack it found only if its own is still
    installed (openvino 2026.4, intel_cpu SigAltStackSetup). Two Cores freed in the order they were made (a
    hot swap's old engine, then its new one) so leave the thread's alternate stack on unmapped memory, and the
    next signal the thread takes (Ctrl-C, SIGTERM: Python runs every handler on that stack) kills the process
    with SIGSEGV instead of stopping it cleanly. One Core loads one plugin, whose stack lives as long as it does.
    """
    global _openvino_core
    with _openvino_core_lock:
        if _openvino_core is None:
            import openvino as ov

            _openvino_core = ov.Core()
        return _openvino_core


def device_kind(device: str | None = None) -> str:
    """'cuda' when CUDA is present (or asked for), else 'cpu'."""
    import torch

    if device:
        return "cuda" if str(device).startswith("cuda") else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_fast_path(device: str) -> str:
    """fp16 autocast + channels_last on CUDA; OpenVINO on CPU."""
    return "fp16" if device_kind(device) == "cuda" else "openvino"


def resolve_fast_path(requested: str, device: str) -> str:
    """The engine `requested` names on this device ('auto' picks the default; unusable choices are errors)."""
    kind = default_fast_path(device) if requested == "auto" else requested
    if kind not in ENGINES:
        raise UsageError(f"fast path {requested!r} unknown; use one of auto, {', '.join(ENGINES)} (serve.fast_path)")
    if kind == "fp16" and device_kind(device) != "cuda":
        raise UsageError("fast path fp16 needs a CUDA device; use auto, openvino or bf16 on CPU (serve.fast_path)")
    if kind in ("openvino", "onnxruntime") and device_kind(device) == "cuda":
        raise UsageError(f"fast path {kind} runs on CPU only here; use auto or fp16 on CUDA (serve.fast_path)")
    return kind


def model_digest(model: Any) -> str:
    """A short content hash of a model's weights (names the exported files in the cache)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _with_embedding(model: Any) -> Any:
    """The classifier wrapped so that one export returns (logits, embedding)."""
    import torch

    class WithEmbedding(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner.forward_with_embedding(images)

    return WithEmbedding(model).eval()


def export_onnx(model: Any, image_size: int, cache_dir: Path) -> Path:
    """The model as ONNX (outputs logits and embedding, dynamic batch), exported once per weights and size."""
    import torch

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"classifier-{model_digest(model)}-{image_size}px.onnx"
    if path.is_file():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    example = torch.zeros(2, 3, image_size, image_size)
    cpu_model = model.to("cpu", memory_format=torch.contiguous_format)
    log.info("exporting the model to ONNX (once per model version) -> %s", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_with_embedding(cpu_model), (example,), str(tmp), input_names=["images"],
                              output_names=["logits", "embedding"], external_data=False, verbose=False,
                              dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}})
        tmp.replace(path)
    except Exception as exc:  # the exporter raises many types
        raise DefectOpsError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                             "serve with fast_path fp32 (serve.fast_path) or report the model") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


class ExportedPredictor(Predictor):
    """A Predictor whose forward pass runs an exported model in OpenVINO or ONNX Runtime (CPU)."""

    def __init__(self, reference: Predictor, engine: str, onnx_path: Path, threads: int | None = None) -> None:
        super().__init__(reference.model, reference.meta, device="cpu", precision="fp32",
                         max_pixels=reference.max_pixels)
        self.threshold = reference.threshold
        self.engine = engine
        self._lock = threading.Lock()
        threads = threads or max(1, len(os.sched_getaffinity(0)))
        if engine == "openvino":
            # Default precision: bf16 on CPUs with AVX-512 BF16 or AMX, else fp32 (parity.py checks the result).
            # One image runs on a latency-tuned compile (all cores on one request); a batch is split over the
            # parallel requests of a throughput-tuned compile (one stream per core group), which on this
            # 2-core CPU gives ~10 % more images/s and degrades less when other processes take a core.
            core = openvino_core()
            single = core.compile_model(str(onnx_path), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                                "INFERENCE_NUM_THREADS": threads})
            batched = core.compile_model(str(onnx_path), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                                 "INFERENCE_NUM_THREADS": threads})
            self._single = single.create_infer_request()
            count = max(1, int(batched.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self._parallel = [batched.create_infer_request() for _ in range(count)]
            self.streams = count
            self.precision = single.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # e.g. bf16, f32
            self._run = self._run_openvino
        elif engine == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            self.precision = "fp32"
            self._run = self._run_onnxruntime
        else:
            raise UsageError(f"engine {engine!r} is not an exported engine; use openvino or onnxruntime")

    def _run_openvino(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) == 1 or len(self._parallel) == 1:
            result = self._single.infer({0: batch})
            return np.asarray(result[0]), np.asarray(result[1])
        parts = np.array_split(batch, min(len(self._parallel), len(batch)))
        requests = self._parallel[: len(parts)]
        for request, part in zip(requests, parts, strict=True):
            request.start_async({0: part})
        outputs = []
        for request in requests:
            request.wait()
            outputs.append((request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy()))
        return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])

    def _run_onnxruntime(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self._session.run(None, {"images": batch})
        return logits, embedding

    def forward(self, batch: Any, stream: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and embeddings of a prepared (N, 3, S, S) batch, computed by the exported engine.

        With `stream` (0 .. streams-1, one caller per stream at a time) the batch runs on that stream alone, so
        callers on different streams compute side by side without waiting for each other; without it, on the
        whole engine (one image on all cores, a batch split over every stream).
        """
        array = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch, dtype=np.float32)
        if stream is not None and self.engine == "openvino":
            result = self._parallel[stream].infer({0: array})
            logits, embedding = np.asarray(result[0]), np.asarray(result[1])
        else:
            with self._lock:
                logits, embedding = self._run(array)
        return logits.astype(np.float32), embedding.astype(np.float32)


def build_engine(reference: Predictor, engine: str, cache_dir: Path) -> Predictor:
    """A Predictor running `engine`, sharing the reference's model, preprocessing, calibration and threshold."""
    if engine == REFERENCE:
        return reference
    if engine in ("bf16", "fp16"):
        fast: Predictor = Predictor(reference.model, reference.meta, device=str(reference.device), precision=engine,
                                    max_pixels=reference.max_pixels)
    elif engine in ("openvino", "onnxruntime"):
        if reference.device.type != "cpu":
            raise UsageError(f"engine {engine} runs on CPU only; the model is on {reference.device}")
        onnx_path = export_onnx(reference.model, reference.image_size, cache_dir)
        reference.model.to("cpu", memory_format=_channels_last())
        fast = ExportedPredictor(reference, engine, onnx_path)
    else:
        raise UsageError(f"engine {engine!r} unknown; use one of {', '.join(ENGINES)}")
    fast.threshold = reference.threshold
    fast.model_version = getattr(reference, "model_version", None)  # type: ignore[attr-defined]
    return fast


def _channels_last() -> Any:
    import torch

    return torch.channels_last
