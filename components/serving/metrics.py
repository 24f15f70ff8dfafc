"""The service's own Prometheus metrics (prometheus_client, module level); BentoML exposes them on /metrics.

BentoML runs prometheus_client in multiprocess mode, where `Info` metrics are not collected, so the served
model is a gauge `served_model_info{model_version,fast_path,device,threshold} 1` (the usual info pattern).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DEFECTS_DETECTED = Counter("defects_detected", "Predictions whose top-1 class is a defect, by defect type",
                           ["defect_type"])
DECISIONS = Counter("decisions", "Decisions returned to the line", ["decision"])
CONFIDENCE = Histogram("prediction_confidence", "Top-1 calibrated probability of each prediction",
                       buckets=(0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 0.999, 1.0))
INFERENCE_LATENCY = Histogram("inference_latency_seconds", "Per image: upload received to prediction ready "
                              "(decode, preprocess, queue, forward)",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCH_SIZE = Histogram("inference_batch_size", "Images per forward pass (adaptive batching)",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SECONDS = Histogram("inference_batch_seconds", "Forward pass time of one batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BAD_REQUESTS = Counter("bad_requests", "Requests refused with a 4xx, by reason", ["reason"])
LOG_DROPPED = Counter("prediction_log_dropped", "Log lines or review items dropped because the writer queue "
                      "was full")
LOG_ERRORS = Counter("prediction_log_write_errors", "Log or review writes that failed")
REVIEW_ITEMS = Counter("review_items", "Images kept in the review queue, by reason", ["reason"])
SERVED_MODEL = Gauge("served_model_info", "The model version this service serves (value 1)",
                     ["model_version", "fast_path", "device", "threshold"], multiprocess_mode="max")
MODEL_RELOADS = Counter("model_reloads", "Hot swaps onto a new deployment record, by outcome (swapped, failed)",
                        ["outcome"])
