"""Fast inference paths and their parity with the fp32 PyTorch model; the fallback to fp32 is recorded."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from components.config import Settings, load_params
from components.errors import DefectOpsError, UsageError
from components.predictor import Predictor
from components.serving.deployment import pin_deployment, read_record
from components.serving.engines import build_engine, resolve_fast_path
from components.serving.params import ParityParams
from components.serving.parity import check_parity, choose_engine, parity_images
from tests.conftest import REPO_ROOT
from tests.serving.conftest import PROBES, probe_png, write_project

BOUNDS = ParityParams(min_top1_agreement=0.995, max_prob_diff=0.05, images=20)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Predictor:
    return Predictor.from_file(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def probe_images() -> list[bytes]:
    return [probe_png(kind) for kind in PROBES] * 4


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the tiny model for the whole module."""
    return tmp_path_factory.mktemp("onnx-cache")


def test_onnxruntime_export_passes_parity(reference: Predictor, probe_images, onnx_cache: Path) -> None:
    candidate = build_engine(reference, "onnxruntime", onnx_cache)
    report = check_parity(reference, candidate, probe_images, BOUNDS, engine="onnxruntime")
    assert report.passed and report.top1_agreement == 1.0 and report.decision_agreement == 1.0
    assert report.max_prob_diff < 1e-4 and report.n_images == 12
    assert list(onnx_cache.glob("*.onnx")), "the export is cached"


def test_openvino_and_bf16_are_measured_against_fp32(reference: Predictor, probe_images, onnx_cache: Path) -> None:
    for engine in ("openvino", "bf16"):
        candidate = build_engine(reference, engine, onnx_cache)
        report = check_parity(reference, candidate, probe_images, BOUNDS, engine=engine)
        assert report.n_images == 12 and report.precision
        assert report.passed == (report.top1_agreement >= 0.995 and report.max_prob_diff <= 0.05)


def test_a_fast_path_that_fails_parity_is_served_on_fp32(reference: Predictor, probe_images,
                                                           onnx_cache: Path) -> None:
    strict = ParityParams(min_top1_agreement=0.995, max_prob_diff=1e-12, images=20)
    served, choice = choose_engine(reference, "onnxruntime", probe_images, strict, onnx_cache)
    assert served is reference and choice.engine == "fp32" and choice.requested == "onnxruntime"
    assert "failed parity" in choice.reason and choice.parity["passed"] is False


def test_decisions_that_flip_at_the_threshold_fail_parity(reference: Predictor, probe_images) -> None:
    """An engine within every probability bound can still move the few images that sit at the threshold across
    it: accept or reject there, review in fp32 (an escape, for a defective part). Their share is bounded too."""
    import copy

    import numpy as np

    class Nudged:  # the reference, its top class a hair less sure: what bf16 rounding does
        precision = "bf16"

        def forward(self, batch, stream=None):
            logits, embeddings = reference.forward(batch)
            logits = logits.copy()
            logits[np.arange(len(logits)), logits.argmax(axis=1)] -= 1e-3
            return logits, embeddings

    batch = np.stack([reference.prepare(image) for image in probe_images[:len(PROBES)]])
    sure = reference.probabilities(reference.forward(torch.as_tensor(batch))[0]).max(axis=1)
    at_threshold = copy.copy(reference)
    at_threshold.threshold = float(sure.max()) - 1e-6  # one probe kind (4 images of 12) decided just above it
    report = check_parity(at_threshold, Nudged(), probe_images, BOUNDS, engine="bf16")
    assert report.top1_agreement == 1.0 and report.max_prob_diff < 1e-3, "every other bound holds"
    assert not report.passed and report.decision_agreement < 0.995
    assert "decision agreement" in report.reason and f"threshold {at_threshold.threshold:.4f}" in report.reason
    assert check_parity(reference, reference, probe_images, BOUNDS).passed


def test_no_real_images_means_fp32(reference: Predictor, tmp_path: Path) -> None:
    served, choice = choose_engine(reference, "auto", [], BOUNDS, tmp_path)
    assert served is reference and choice.engine == "fp32" and "no real images" in choice.reason


def test_unreadable_images_cannot_prove_parity(reference: Predictor) -> None:
    with pytest.raises(DefectOpsError, match="none of the 2 images could be read"):
        check_parity(reference, reference, [b"x", b"y"], BOUNDS)


def test_fast_path_names_are_checked_against_the_device() -> None:
    assert resolve_fast_path("auto", "cpu") == "openvino" and resolve_fast_path("auto", "cuda:0") == "fp16"
    with pytest.raises(UsageError, match="needs a CUDA device"):
        resolve_fast_path("fp16", "cpu")
    with pytest.raises(UsageError, match="runs on CPU only"):
        resolve_fast_path("openvino", "cuda")


def test_pin_deployment_records_the_failed_parity_and_fp32(tiny_model: Path, probe_images, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project")
    settings = Settings(project=project, home=tmp_path / "home")
    params = load_params(project / "params.yaml")
    params.model_extra["serve"]["parity"]["max_prob_diff"] = 1e-12
    record = pin_deployment(settings, params, str(tiny_model), deployed_by="tests", images=probe_images)
    assert read_record(settings) == record
    assert record.fast_path == "fp32" and record.requested_fast_path == "onnxruntime"
    assert record.parity["passed"] is False and "failed parity" in record.fast_path_reason
    assert record.model_uri == str(tiny_model.resolve()) and record.threshold == pytest.approx(0.8)


# a hot swap in a fresh interpreter: the new engine is built while the old one serves, the old one goes, then the
# new one (the next swap, or the end); then the service is stopped with a signal, which its handler must get
SWAP_THEN_SIGNAL = textwrap.dedent("""
    import gc, signal, sys
    from pathlib import Path
    from components.predictor import Predictor
    from components.serving.engines import build_engine

    reference = Predictor.from_file(Path(sys.argv[1]), device="cpu")
    old = build_engine(reference, "openvino", Path(sys.argv[2]))
    new = build_engine(reference, "openvino", Path(sys.argv[2]))
    del old; gc.collect()
    del new; gc.collect()
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    signal.raise_signal(signal.SIGTERM)
    print("handled", seen)
""")


def test_a_signal_after_openvino_engines_come_and_go_reaches_its_handler(tiny_model: Path, onnx_cache: Path) -> None:
    """Each OpenVINO Core's CPU plugin swaps the thread's alternate signal stack and unmaps its own when freed;
    with one Core per engine, two freed in the order they were made left the stack unmapped, and SIGTERM then
    killed the process with SIGSEGV (exit -11) instead of running the handler. Engines now share one Core."""
    done = subprocess.run([sys.executable, "-c", SWAP_THEN_SIGNAL, str(tiny_model), str(onnx_cache)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert f"handled [{int(signal.SIGTERM)}]" in done.stdout


@pytest.mark.realdata
def test_parity_on_real_magnetic_tile_images(reference: Predictor, magnetic_tile: Path, tmp_path: Path,
                                              onnx_cache: Path) -> None:
    settings = Settings(project=tmp_path, home=tmp_path / "home", demo_data=str(magnetic_tile))
    images = parity_images(settings, 60)
    assert len(images) == 60 and images == parity_images(settings, 60), "a fixed, seeded sample"
    _, choice = choose_engine(reference, "onnxruntime", images, BOUNDS, onnx_cache)
    assert choice.engine == "onnxruntime" and choice.parity["n_images"] == 60
    assert choice.parity["top1_agreement"] == 1.0


def test_the_dense_design_exports_with_parity_and_explains(probe_images, tmp_path: Path) -> None:
    """The CPU profile's dense design takes the same fast paths (OpenVINO, ONNX Runtime) and Grad-CAM."""
    import torch

    from components.serving.explain import GradCamExplainer
    from components.training.models import build_model

    torch.manual_seed(0)
    model, _ = build_model("convnet", 3, hidden=16, design="dense", width=4)
    meta = {"classes": ["normal", "dent", "scratch"], "normal_class": "normal", "image_size": 64,
            "normalization": {"kind": "per_image"}, "calibration": {"temperature": 1.0, "threshold": 0.5}}
    reference = Predictor(model, meta, device="cpu")
    for engine in ("onnxruntime", "openvino"):
        report = check_parity(reference, build_engine(reference, engine, tmp_path), probe_images, BOUNDS, engine=engine)
        tolerance = 2e-2 if report.precision == "bf16" else 1e-3  # OpenVINO runs bf16 where the CPU has it
        assert report.passed and report.max_prob_diff < tolerance, (engine, report.precision)
    tensor = reference.prepare(probe_images[0])
    heatmap = GradCamExplainer(model, torch.device("cpu")).heatmap(tensor, target=1)
    assert heatmap.shape == (64, 64) and 0 <= heatmap.min() and heatmap.max() <= 1


def test_openvino_streams_compute_side_by_side_with_the_same_answers(reference: Predictor, probe_images,
                                                                    onnx_cache: Path) -> None:
    """The batcher runs one batch per OpenVINO stream from its own thread: same figures as the whole engine."""
    import threading

    import numpy as np
    import torch

    engine = build_engine(reference, "openvino", onnx_cache)
    batch = torch.stack([engine.prepare(raw) for raw in probe_images[:4]])
    whole_logits, whole_embedding = engine.forward(batch)
    assert engine.streams >= 1
    answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def on_stream(stream: int) -> None:
        for _ in range(3):
            answers[stream] = engine.forward(batch, stream)

    threads = [threading.Thread(target=on_stream, args=(s,)) for s in range(engine.streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == list(range(engine.streams))
    for logits, embedding in answers.values():
        assert np.allclose(logits, whole_logits, atol=1e-5) and np.allclose(embedding, whole_embedding, atol=1e-5)


def test_every_engine_scales_by_the_stored_temperature(tiny_model: Path, probe_images, onnx_cache: Path) -> None:
    """Served probabilities are softmax(logits / T) with the model's own T, on fp32 and the fast paths alike (every
    other serving test's model has T = 1, where dropping the scaling would change nothing)."""
    import numpy as np
    import torch

    from components.training.train import load_model_file

    model, meta = load_model_file(tiny_model)
    warm = Predictor(model, {**meta, "calibration": {**meta["calibration"], "temperature": 3.0}}, device="cpu")
    batch = torch.stack([warm.prepare(image) for image in probe_images[:len(PROBES)]])
    logits, _ = warm.forward(batch)
    def softmax(x: np.ndarray) -> np.ndarray:
        return np.exp(x - x.max(axis=1, keepdims=True)) / np.exp(x - x.max(axis=1, keepdims=True)).sum(1, keepdims=True)

    scaled = softmax(logits / 3.0)
    assert not np.allclose(scaled.max(axis=1), softmax(logits).max(axis=1), atol=0.05)  # T moves these answers
    for name in ("fp32", "onnxruntime", "bf16"):
        engine = build_engine(warm, name, onnx_cache / "warm")
        confidences = [p.confidence for p in engine.predict_tensors(batch)]
        assert engine.temperature == 3.0
        assert np.allclose(confidences, scaled.max(axis=1), atol=0.02 if name == "bf16" else 1e-4), name
