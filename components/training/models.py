"""The pure classifiers and the function that builds them; the training loop is in `loop.py`.

Two designs share one interface (forward, forward_with_embedding, forward_train, embed, architecture):
- `global`: a torchvision ResNet, optional spatial attention, global pooling, the plant's MLP head;
- `dense`: a fully convolutional trunk (a torchvision ResNet cut after `dense_stage`, or the small `convnet`)
  names a class for every cell of the image (the normal class = no defect there), trained on the defect masks;
  the image's class comes from statistics of those cell probabilities through the plant's MLP head.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.errors import UsageError
from components.training.params import Arch, Design

log = logging.getLogger(__name__)

_STAGES = ("layer1", "layer2", "layer3", "layer4")
EVIDENCE_STATS = ("peak", "top", "mean", "area")  # per class, see DenseDefectClassifier.evidence


class SpatialAttention(nn.Module):
    """CBAM spatial gate: channel mean and max maps -> 7x7 conv -> sigmoid, multiplied into the features."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class DefectClassifier(nn.Module):
    """ResNet features -> (attention) -> global average pool -> dropout/Linear/ReLU/dropout/Linear.

    With `mask_head`, a 1x1 convolution on the stride-16 features (layer3) predicts a coarse defect map; it is
    trained against the defect masks as an auxiliary task (see loop.py) and can localise defects at inference.
    With `mask_gate` as well, that map (sigmoid, max-pooled to the last map's size) gates the last feature map
    before pooling, so the classifier looks where the defect is instead of averaging it away.
    `mask_head_width` puts a 3x3 convolution of that many channels before the head's 1x1 one.
    With `mask_classes`, the head names every cell's class instead (the normal class = no defect there), trained
    like the dense design's cells; its defect map, and the gate, are then 1 - P(normal class).
    With `output_stride` 16, layer4 keeps layer3's resolution (its first block does not stride): a last map of
    14x14 cells at 224 px instead of 7x7, for 1.7x the FLOPs of a ResNet-18.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        dropout: float = 0.3,
        hidden: int = 512,
        attention: bool = False,
        freeze_stages: int = 0,
        mask_head: bool = False,
        mask_gate: bool = False,
        output_stride: int = 32,
        mask_head_width: int = 0,
        mask_classes: bool = False,
        normal_index: int = 0,
    ) -> None:
        super().__init__()
        if mask_classes and not 0 <= normal_index < num_classes:
            raise UsageError(f"normal_index {normal_index} is not one of the {num_classes} classes")
        if output_stride not in (16, 32):
            raise UsageError(f"output_stride {output_stride}: use 32 (the ResNet as designed) or 16")
        if output_stride == 16:
            _unstride(backbone.layer4[0])
        self.output_stride = output_stride
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.arch = "custom"  # build_model names the torchvision architecture
        self.dropout = dropout
        self.attention = SpatialAttention() if attention else nn.Identity()
        mid_channels = _out_channels(backbone.layer3[-1])
        self.mask_head_width = mask_head_width
        self.mask_classes, self.normal_index = mask_classes, normal_index
        head_out = num_classes if mask_classes else 1
        self.defect_head = _defect_head(mid_channels, mask_head_width, head_out) if mask_head or mask_gate else None
        self.mask_gate = mask_gate
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = feature_dim
        self.hidden = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.embedding_dim = hidden
        self.freeze_stages = freeze_stages
        for module in self._frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def architecture(self) -> dict[str, object]:
        """What `build_model` needs to rebuild this network (stored in the model file as `arch`)."""
        return {"name": self.arch, "dropout": self.dropout, "hidden": self.embedding_dim,
                "attention": isinstance(self.attention, SpatialAttention), "mask_head": self.defect_head is not None,
                "mask_gate": self.mask_gate, "output_stride": self.output_stride,
                "mask_head_width": self.mask_head_width, "mask_classes": self.mask_classes,
                "normal_index": self.normal_index}

    def _frozen_modules(self) -> list[nn.Module]:
        b = self.backbone
        stem = [b.conv1, b.bn1]
        stages = [getattr(b, name) for name in _STAGES]
        return (stem + stages)[: (2 if self.freeze_stages >= 1 else 0) + max(0, self.freeze_stages - 1)]

    def train(self, mode: bool = True) -> DefectClassifier:
        """Switch modes, keeping frozen stages (and their batch-norm statistics) in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    @property
    def cam_layer(self) -> nn.Module:
        """The layer Grad-CAM explains: the last feature map the head sees (after the attention gate)."""
        return self.backbone.layer4[-1] if isinstance(self.attention, nn.Identity) else self.attention

    def _stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last feature map (attention- and mask-gated) and the defect-map logits (None: no head)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        mid = b.layer3(b.layer2(b.layer1(x)))
        last = self.attention(b.layer4(mid))
        defect = self.defect_head(mid) if self.defect_head is not None else None
        if self.mask_gate:
            last = last * F.adaptive_max_pool2d(self._defect_probability(defect), last.shape[-2:])
        return last, defect

    def _defect_probability(self, defect_logits: torch.Tensor) -> torch.Tensor:
        """Per-cell probability of a defect (N, 1, h, w) from the head's logits."""
        if not self.mask_classes:
            return torch.sigmoid(defect_logits)
        normal = torch.softmax(defect_logits.float(), dim=1)[:, self.normal_index : self.normal_index + 1]
        return (1 - normal).to(defect_logits.dtype)

    def _pooled(self, last: torch.Tensor) -> torch.Tensor:
        """The last feature map averaged to one vector per image (what the head and a contrastive loss see)."""
        return torch.flatten(self.pool(last), 1)

    def _embed_map(self, last: torch.Tensor) -> torch.Tensor:
        return self.hidden(self._pooled(last))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map, after the attention gate."""
        return self._stages(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (hidden-layer) features, one `embedding_dim` vector per image."""
        return self._embed_map(self.feature_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.classifier(self.embed(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embeddings from one pass."""
        embedding = self.embed(x)
        return self.classifier(embedding), embedding

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits and defect-map logits (None without a mask head) from one pass."""
        logits, defect, _ = self.forward_contrast(x)
        return logits, defect

    def forward_contrast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Class logits, defect-map logits and the pooled features (what a contrastive loss compares)."""
        last, defect = self._stages(x)
        pooled = self._pooled(last)
        return self.classifier(self.hidden(pooled)), defect, pooled

    def defect_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell defect probability at 1/16 of the input resolution (needs the mask head)."""
        if self.defect_head is None:
            raise UsageError("this model has no defect-map head; train it with mask_head: true")
        return self._defect_probability(self._stages(x)[1])


def _defect_head(channels: int, width: int, out: int = 1) -> nn.Module:
    """The defect-map head: a 1x1 convolution to `out` channels, after a 3x3 Conv-BN-ReLU of `width` if set."""
    from torchvision.ops import Conv2dNormActivation

    if width <= 0:
        return nn.Conv2d(channels, out, kernel_size=1)
    return nn.Sequential(Conv2dNormActivation(channels, width, kernel_size=3), nn.Conv2d(width, out, kernel_size=1))


def _unstride(block: nn.Module) -> None:
    """Make a ResNet block keep its input's resolution: its strided convolutions (main path and shortcut) step 1."""
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)


def convnet_trunk(width: int = 16) -> nn.Sequential:
    """A small VGG-style trunk (torchvision's Conv-BN-ReLU blocks): full resolution first, stride 8 at the end.

    The CPU profile's trunk: thin cracks and blowholes of a few pixels stay visible (no strided stem), and
    its receptive field (about 70 px) sees a defect and its surroundings, not the whole tile, which keeps it
    from memorising the look of individual tiles (see README, "What exists").
    """
    from torchvision.ops import Conv2dNormActivation

    def block(c_in: int, c_out: int) -> nn.Module:
        return Conv2dNormActivation(c_in, c_out, kernel_size=3)

    w = width
    return nn.Sequential(
        block(3, w), block(w, w), nn.MaxPool2d(2),
        block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
        block(2 * w, 4 * w), block(4 * w, 4 * w), nn.MaxPool2d(2),
        block(4 * w, 8 * w), block(8 * w, 8 * w), block(8 * w, 8 * w),
    )


class ResNetTrunk(nn.Module):
    """A torchvision ResNet's stem and its first `stages` layers (stride 4 * 2**(stages - 1))."""

    def __init__(self, backbone: nn.Module, stages: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = stages
        for name in _STAGES[stages:]:
            setattr(backbone, name, nn.Identity())
        backbone.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        for name in _STAGES[: self.stages]:
            x = getattr(b, name)(x)
        return x


def _logit(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class DenseDefectClassifier(nn.Module):
    """Cells -> classes -> pooled evidence -> dropout/Linear/ReLU/dropout/Linear.

    `cells(x)` gives class logits for every cell of the trunk's map (stride 8 or 16); softmax over classes,
    the normal class meaning "no defect in this cell". Per class, the evidence is the peak (maximum of the
    3x3-smoothed map), the mean of the top 2% of cells, the mean, and the share of cells where that class
    wins with p > 0.5, all on the logit scale. The head (the plant's: dropout, a `hidden`-unit layer with
    ReLU, dropout, the class layer) maps that evidence to the image's class. The head sees the evidence
    detached, so the trunk learns only from the masks (`forward_train`'s cell logits) and the head only from
    image labels; `components/training/head.py` refits the head on whole training images after the trunk.
    """

    def __init__(self, trunk: nn.Module, trunk_channels: int, num_classes: int, dropout: float = 0.3,
                 hidden: int = 512, describe: dict[str, object] | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.cell_head = nn.Conv2d(trunk_channels, num_classes, kernel_size=1)
        self.dropout = dropout
        self.evidence_dim = len(EVIDENCE_STATS) * num_classes
        self.hidden = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.evidence_dim, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.embedding_dim = hidden
        self.arch = "custom"
        self._describe = dict(describe or {})

    def architecture(self) -> dict[str, object]:
        """What `build_model` needs to rebuild this network (stored in the model file as `arch`)."""
        return {"name": self.arch, "design": "dense", "dropout": self.dropout, "hidden": self.embedding_dim,
                **self._describe}

    @property
    def cam_layer(self) -> nn.Module:
        """The layer Grad-CAM explains: the trunk's last block."""
        if isinstance(self.trunk, ResNetTrunk):
            return getattr(self.trunk.backbone, _STAGES[self.trunk.stages - 1])[-1]
        return self.trunk[-1]

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell class logits (N, classes, H/stride, W/stride)."""
        return self.cell_head(self.trunk(x))

    def defect_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell class probabilities (softmax over classes)."""
        return torch.softmax(self.cells(x).float(), dim=1)

    @staticmethod
    def evidence(cell_logits: torch.Tensor) -> torch.Tensor:
        """Pooled per-class statistics of a cell map, on the logit scale (N, 4 * classes)."""
        p = torch.softmax(cell_logits.float(), dim=1)
        flat = p.flatten(2)
        k = max(1, flat.shape[-1] // 50)
        peak = F.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=False).flatten(2).amax(-1)
        top = flat.topk(k, dim=-1).values.mean(-1)
        area = (flat > 0.5).float().mean(-1)
        return torch.cat([_logit(peak), _logit(top), _logit(flat.mean(-1)), _logit(area)], dim=1)

    def _head(self, evidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.hidden(evidence)
        return self.classifier(embedding), embedding

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embeddings from one pass."""
        return self._head(self.evidence(self.cells(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (hidden-layer) features, one `embedding_dim` vector per image."""
        return self.forward_with_embedding(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.forward_with_embedding(x)[0]

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (the head on detached evidence) and the cell logits the mask loss trains."""
        cells = self.cells(x)
        return self._head(self.evidence(cells.detach()))[0], cells


Classifier = DefectClassifier | DenseDefectClassifier


def _last_norm(block: nn.Module) -> nn.BatchNorm2d:
    """A ResNet block's last batch norm, the end of its residual branch (a bottleneck's third, a basic block's
    second)."""
    return block.bn3 if hasattr(block, "bn3") else block.bn2


def _out_channels(block: nn.Module) -> int:
    """The channels a ResNet block puts out."""
    return _last_norm(block).num_features


class _DropPath:
    """A forward hook on a residual branch's last batch norm: in training, zero the branch for a random share
    `rate` of the samples (scaling the rest up), so the block is skipped for them (stochastic depth)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import stochastic_depth

        return stochastic_depth(output, self.rate, "row", module.training)


def add_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth on every ResNet block of `model`, the rate rising linearly to `rate` at the last block.

    Hooks, not modules: the state_dict, the model file and inference are unchanged.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    if rate > 0 and not blocks:
        raise UsageError(f"drop_path {rate}: the network has no residual blocks (arch convnet); set drop_path: 0")
    for i, block in enumerate(blocks):
        _last_norm(block).register_forward_hook(_DropPath(rate * (i + 1) / len(blocks)))


def _resnet10(weights: None = None, **kwargs) -> nn.Module:
    """ResNet-18's stem, stages and widths with one basic block per stage instead of two (half the compute);
    torchvision has no ImageNet weights for it (`weights` is taken, and always None, like its builders')."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


def _torchvision(arch: str) -> tuple[type, object]:
    from torchvision import models as tvm

    builders = {
        "resnet10": (_resnet10, None),
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
        "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    }
    if arch not in builders:
        raise UsageError(
            f"unknown architecture {arch!r}; use one of {sorted(builders)} (train.profiles.*.arch)"
        )
    return builders[arch]


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision's cache keeps the ImageNet weights of `arch` ($TORCH_HOME/hub/checkpoints/...)."""
    _, weights = _torchvision(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _imagenet_state(arch: str, allow_download: bool) -> tuple[dict | None, str]:
    _, weights = _torchvision(arch)
    if weights is None:
        return None, f"torchvision has no ImageNet weights for {arch}"
    cached = imagenet_weights_file(arch)
    if not cached.is_file() and not allow_download:
        return None, (
            f"{cached.name} not in the torchvision cache {cached.parent}; place the file there "
            "(or set train.download_weights: true when online)"
        )
    try:
        return weights.get_state_dict(progress=False, check_hash=False), f"imagenet:{weights.name}"
    except Exception as exc:  # noqa: BLE001 - offline, proxy, corrupt cache: all mean "not available"
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _file_state(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path}: weights file not found; give an existing .pth file, 'imagenet' or null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"{path}: not a loadable state_dict ({exc}); save one with torch.save(model.state_dict())"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"{path}: holds a {type(state).__name__}, not a state_dict; save model.state_dict()")
    for prefix in ("backbone.", "trunk.backbone."):  # one of our own model files: take its backbone
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


def build_model(
    arch: Arch,
    num_classes: int,
    dropout: float = 0.3,
    hidden: int = 512,
    attention: bool = False,
    freeze_stages: int = 0,
    weights: str | Path | None = None,
    allow_download: bool = False,
    mask_head: bool = False,
    mask_gate: bool = False,
    design: Design = "global",
    dense_stage: int = 3,
    width: int = 16,
    output_stride: int = 32,
    mask_head_width: int = 0,
    mask_classes: bool = False,
    normal_index: int = 0,
) -> tuple[Classifier, str]:
    """The classifier and which weights it started from ('imagenet:...', 'file:...', 'random-init')."""
    if num_classes < 2:
        raise UsageError(f"num_classes is {num_classes}; a classifier needs at least two classes")
    if arch == "convnet":
        if design != "dense":
            raise UsageError("arch convnet is a dense trunk; set design: dense (or use a resnet for design: global)")
        if weights is not None and str(weights) != "":
            raise UsageError(f"arch convnet has no pretrained weights (asked for {weights}); set weights: null")
        model = DenseDefectClassifier(convnet_trunk(width), 8 * width, num_classes, dropout, hidden,
                                      {"width": width})
        model.arch = arch
        return model, "random-init"
    builder, _ = _torchvision(arch)
    backbone = builder(weights=None, zero_init_residual=True)
    feature_dim = backbone.fc.in_features
    weights_used, state = _initial_state(arch, weights, allow_download)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            result = backbone.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # same names, other shapes (a resnet50's weights for a resnet18)
            shapes = str(exc).split("size mismatch for ", 1)[-1].splitlines()[0][:200]
            raise UsageError(f"{weights_used}: weights do not fit {arch} (size mismatch for {shapes}); use "
                             f"weights saved from a {arch}") from None
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise UsageError(
                f"{weights_used}: weights do not fit {arch} (missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}); use weights saved from a {arch}"
            )
        log.info("%s backbone initialised from %s", arch, weights_used)
    if design == "dense":
        if not 1 <= dense_stage <= 4:
            raise UsageError(f"dense_stage {dense_stage}: use 1..4 (the last ResNet stage of the trunk)")
        channels = _out_channels(getattr(backbone, _STAGES[dense_stage - 1])[-1])
        model = DenseDefectClassifier(ResNetTrunk(backbone, dense_stage), channels, num_classes, dropout, hidden,
                                      {"dense_stage": dense_stage})
    else:
        model = DefectClassifier(
            backbone, feature_dim, num_classes, dropout, hidden, attention, freeze_stages, mask_head, mask_gate,
            output_stride, mask_head_width, mask_classes, normal_index,
        )
    model.arch = arch
    return model, weights_used


def _initial_state(arch: str, weights: str | Path | None, allow_download: bool) -> tuple[str, dict | None]:
    """Which weights a ResNet starts from and their state_dict (None: random initialisation)."""
    if weights is not None and str(weights).lower() == "imagenet":
        state, note = _imagenet_state(arch, allow_download)
        if state is None:
            log.warning(
                "ImageNet weights for %s unavailable (%s): training from random initialisation", arch, note
            )
            return f"random-init (ImageNet weights unavailable: {note})", None
        return note, state
    if weights is not None and str(weights) != "":
        path = Path(weights).expanduser().resolve()
        return f"file:{path}", _file_state(path)
    return "random-init", None
