"""Grad-CAM overlays (the `grad-cam` package) of the class the service predicted, on the fp32 model."""

from __future__ import annotations

import base64
import io
import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class GradCamExplainer:
    """Grad-CAM on a private fp32 copy of the classifier (its hooks never touch the serving model)."""

    def __init__(self, model: Any, device: Any) -> None:
        import copy

        import torch

        self.model = copy.deepcopy(model).float().to(device, memory_format=torch.contiguous_format).eval()
        self.device = device
        self.target_layer = self.model.cam_layer  # the last feature map the head sees
        self._lock = threading.Lock()

    def heatmap(self, tensor: Any, target: int) -> np.ndarray:
        """The (S, S) Grad-CAM map in [0, 1] of class index `target` for one prepared (3, S, S) image."""
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        batch = tensor.unsqueeze(0).float().to(self.device)
        with self._lock, GradCAM(model=self.model, target_layers=[self.target_layer]) as cam:
            return cam(input_tensor=batch, targets=[ClassifierOutputTarget(target)])[0]

    @staticmethod
    def overlay(rgb: np.ndarray, heatmap: np.ndarray, max_side: int = 1024) -> np.ndarray:
        """The heatmap resized to the image (downscaled to `max_side`) and blended over it, uint8 RGB."""
        import cv2
        from pytorch_grad_cam.utils.image import show_cam_on_image

        height, width = rgb.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        if scale < 1.0:
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        cam = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return show_cam_on_image(rgb.astype(np.float32) / 255.0, np.clip(cam, 0, 1), use_rgb=True)

    def overlay_base64(self, rgb: np.ndarray, tensor: Any, target: int, max_side: int = 1024) -> str:
        """The overlay as a base64-encoded PNG."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.overlay(rgb, self.heatmap(tensor, target), max_side)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
