"""Serving: the BentoML service and what it stands on.

    service.py     the BentoML service `DefectClassifier` (thin: decode, batch, log; the Predictor does the rest)
    deployment.py  the deployment record (<state>/deployed.json): the one pinned model version that is served
    engines.py     fast inference paths behind the Predictor (OpenVINO, ONNX Runtime, bf16/fp16 autocast)
    parity.py      parity of a fast path with fp32 PyTorch on real images; the choice of what to serve
    batching.py    adaptive batching of single images across requests (one inference thread per engine stream)
    predlog.py     the production log (background writer, torn-line-safe reader, retention, compact embedding)
    review.py      the review queue and `defectops review import`
    explain.py     Grad-CAM overlays for /explain
    metrics.py     the service's Prometheus metrics
    client.py      the line's client with the review fail-safe
    params.py      the `serve` section of params.yaml
    run.py         `defectops serve`
"""
