"""Typed params of the `augment` and `train` sections of params.yaml, validated at the boundary."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.config import Params
from components.errors import UsageError, first_validation_error

Arch = Literal["resnet10", "resnet18", "resnet34", "resnet50", "convnet"]  # models.py builds them
Design = Literal["global", "dense"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Normalization = Literal["imagenet", "per_image", "detail_bands", "log_detail_bands"]  # transforms.py applies them
Fit = Literal["squash", "pad"]  # how transforms.py brings a picture to the square input


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentParams(_Section):
    """Training-time augmentation (albumentations); evaluation only brings the picture to the square (`fit`)."""

    crop_scale: tuple[float, float] | None = Field(
        (0.8, 1.0), description="area range of a random crop of the square picture; null = no crop"
    )
    crop_ratio: tuple[float, float] = Field((0.75, 1.333), description="aspect range of that crop")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.5, ge=0, le=1, description="probability of a vertical flip")
    rotate90: float = Field(0.5, ge=0, le=1, description="probability of a random 90-degree rotation")
    affine: float = Field(0.5, ge=0, le=1, description="probability of the small affine warp below")
    affine_scale: tuple[float, float] = (0.9, 1.1)
    affine_translate: float = Field(0.05, ge=0, le=0.5, description="fraction of the side")
    affine_rotate: float = Field(15.0, ge=0, le=180, description="degrees either way")
    brightness_contrast: float = Field(
        0.5, ge=0, le=1, description="probability of brightness/contrast jitter"
    )
    brightness_limit: float = Field(0.2, ge=0, le=1)
    contrast_limit: float = Field(0.2, ge=0, le=1)
    gamma: float = Field(
        0.0, ge=0, le=1, description="probability of a gamma change (another exposure's or sensor's response curve)"
    )
    gamma_limit: tuple[float, float] = Field((80.0, 120.0), description="gamma range in percent (100 = unchanged)")
    noise: float = Field(0.0, ge=0, le=1, description="probability of Gaussian noise")
    noise_std: tuple[float, float] = Field((0.01, 0.05), description="noise std as a fraction of 255")
    blur: float = Field(0.0, ge=0, le=1, description="probability of a small Gaussian blur")
    elastic: float = Field(0.0, ge=0, le=1, description="probability of an elastic warp (new defect outlines)")
    elastic_alpha: float = Field(250.0, ge=0, description="elastic warp strength (about 2 px median at 224 px)")
    elastic_sigma: float = Field(10.0, gt=0, description="elastic warp smoothness in px")
    erase: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability of random erasing: 1-3 rectangles inpainted from their surroundings (the mask "
        "cleared there, so keep_defect re-draws a view that erased the defect)",
    )
    erase_size: tuple[float, float] = Field((0.05, 0.15), description="an erased rectangle's side range (fraction)")
    keep_defect: float = Field(
        0.0,
        ge=0,
        le=1,
        description="a defect sample whose augmented view keeps less than this share of its masked defect is "
        "re-drawn (crops and shifts otherwise cut edge defects out of the picture; needs masks)",
    )
    paste: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability that a masked defect image is pasted onto a "
        "random normal image (needs mask_head, i.e. masks)",
    )


_GLOBAL_ONLY = (  # design: global options; design: dense refuses them when set
    "attention", "mask_gate", "mask_head_width", "mask_classes", "freeze_stages", "output_stride", "supcon_weight",
    "distill_from")


class ProfileParams(_Section):
    """One hardware profile: model, input size, schedule and loop settings."""

    arch: Arch = Field(
        "resnet18",
        description="torchvision ResNet (resnet10: ResNet-18 with one block a stage, no ImageNet weights), "
        "or convnet (a small dense trunk, design: dense)",
    )
    design: Design = Field(
        "global",
        description="global: pooled ResNet features -> head; dense: a class for every cell, trained on the "
        "defect masks, pooled evidence -> head (components/training/models.py)",
    )
    dense_stage: int = Field(3, ge=1, le=4, description="dense design on a ResNet: its last stage in the trunk")
    width: int = Field(16, ge=4, le=256, description="convnet: channels of its first block (x2 per stage)")
    patch_size: int | None = Field(
        None, ge=16, description="dense design: train on crops of this size from the image_size picture"
    )
    patch_focus: float = Field(
        0.7, ge=0, le=1, description="share of defect-image patches placed on the defect (else anywhere)"
    )
    head_refit_epochs: int = Field(
        0, ge=0, description="dense design: after training, refit the head on whole training pictures (0 = off)"
    )
    weights: str | None = Field(
        "imagenet", description="'imagenet', a local .pth file, or null for random init"
    )
    image_size: int = Field(224, ge=32, le=1024)
    dropout: float = Field(0.3, ge=0, lt=1)
    hidden: int = Field(512, ge=8)
    attention: bool = False
    mask_head: bool = Field(False, description="auxiliary defect-map head trained on the defect masks")
    mask_gate: bool = Field(False, description="gate the last feature map with the predicted defect map")
    mask_head_width: int = Field(
        0, ge=0, description="defect-map head: 0 = a 1x1 convolution on layer3; N = a 3x3 convolution of N "
        "channels (batch norm, ReLU) before it"
    )
    mask_classes: bool = Field(
        False, description="defect-map head: a channel per class, every cell trained to the picture's class where "
        "its mask shows a defect and to the normal class elsewhere (as the dense design's cells); the map and "
        "the gate are 1 - P(normal)"
    )
    output_stride: Literal[16, 32] = Field(
        32, description="stride of the last feature map: 16 keeps layer4 at layer3's resolution (1.7x a "
        "ResNet-18's FLOPs)"
    )
    drop_path: float = Field(
        0.0, ge=0, lt=1, description="stochastic depth: the share of samples for which a residual block is skipped "
        "in training, rising linearly to this at the last block (ResNets only)"
    )
    mask_loss_weight: float = Field(0.5, ge=0, description="weight of the defect-map loss (with mask_head)")
    mask_pos_weight: float = Field(5.0, gt=0, description="BCE weight of defect cells in the defect map")
    normalize: Normalization = Field(
        "imagenet",
        description="input scaling: ImageNet mean/std; each image to zero mean and unit std; or detail_bands, "
        "the grey image standardised plus its fine and mid-scale detail as the other two channels; "
        "log_detail_bands, the same of the log grey image",
    )
    fit: Fit = Field(
        "squash",
        description="squash: resize to image_size x image_size (aspect not kept); pad: the longer side to "
        "image_size, the shorter one mirror-padded to it (aspect kept)",
    )
    freeze_stages: int = Field(0, ge=0, le=5, description="0 = train all; 1 = stem; 2..5 = stem + layer1..4")
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(30, ge=1)
    min_epochs: int = Field(0, ge=0, description="no early stop before this epoch")
    patience: int = Field(8, ge=1, description="epochs without a better val macro-F1 before stopping")
    keep: Literal["best", "last"] = Field(
        "best",
        description="best: the epoch with the best val macro-F1, stopping early after `patience`; last: the "
        "final epoch, no early stop (the `cpu` profile: on a small val split the best epoch is picked on noise)",
    )
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    loss: Literal["ce", "weighted_ce", "focal"] = "weighted_ce"
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weight_power: float = Field(
        0.5, ge=0, le=1, description="class weight = (share of the class)^-power; 0 = none"
    )
    sampler: Literal["uniform", "class_balanced"] = "uniform"
    sampler_power: float = Field(0.5, ge=0, le=1, description="sample weight = (class count)^-power")
    mixup_alpha: float = Field(
        0.0, ge=0, description="mixup: blend pairs of training pictures with weights ~ Beta(alpha, alpha); 0 = off"
    )
    mixup_prob: float = Field(1.0, ge=0, le=1, description="mixup: share of the batches blended")
    cutmix_alpha: float = Field(
        0.0, ge=0, description="cutmix: a box of another training picture (and its mask) pasted in, its area "
        "~ Beta(alpha, alpha), the labels weighted as `cutmix_labels` says; 0 = off"
    )
    cutmix_prob: float = Field(1.0, ge=0, le=1, description="cutmix: share of the batches mixed")
    cutmix_labels: Literal["area", "mask"] = Field(
        "area", description="cutmix: weigh the two labels by the box's area, or (mask) by the share of each "
        "picture's defect mask left in view, a normal picture counting only where no defect shows"
    )
    sam_rho: float = Field(
        0.0, ge=0, description="sharpness-aware minimisation: radius of the uphill step (e.g. 0.05); 0 = off. "
        "Each step then takes two forward and backward passes"
    )
    supcon_weight: float = Field(
        0.0, ge=0, description="supervised contrastive loss (Khosla et al. 2020) on the pooled features, through a "
        "projection used in training only, added at this weight on the batches that are not mixed; 0 = off"
    )
    supcon_temperature: float = Field(0.1, gt=0, description="supervised contrastive loss: its temperature")
    distill_from: str | None = Field(
        None, description="knowledge distillation: a model file (model.pt) trained on the same classes, input and "
        "training split, whose softened class probabilities on each training picture the model also learns "
        "(list the file in dvc.yaml's train deps too, so that `dvc repro` retrains when it changes); None = off"
    )
    distill_weight: float = Field(
        0.5, ge=0, le=1, description="knowledge distillation: the teacher's share of the class loss (the labels' "
        "is the rest)"
    )
    distill_temperature: float = Field(2.0, gt=0, description="knowledge distillation: the softening temperature")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="evaluate an EMA of the weights (e.g. 0.99)"
    )
    precision: Precision = "auto"
    channels_last: bool = True
    num_workers: int = Field(1, ge=0)
    threads: int = Field(
        0,
        ge=0,
        description="torch compute threads; 0 = auto: the cores other processes leave free, re-checked "
        "every 10 s of training, at least 1",
    )
    cache_images: bool = Field(True, description="keep decoded images in memory (decode once per run)")
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time (the kept epoch per `keep`)")

    @model_validator(mode="after")
    def _consistent(self) -> ProfileParams:
        if self.min_epochs > self.epochs:
            raise ValueError(f"min_epochs {self.min_epochs} exceeds epochs {self.epochs}")
        if self.mask_gate and not self.mask_head:
            raise ValueError("mask_gate needs mask_head: true (the gate is the predicted defect map)")
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            raise ValueError("mixup and cutmix are two ways to mix a batch; set mixup_alpha or cutmix_alpha to 0")
        if self.cutmix_labels == "mask" and not self.uses_masks:
            raise ValueError("cutmix_labels: mask weighs the labels by the defect masks; set mask_head: true "
                             "or cutmix_labels: area")
        if (self.design == "dense" or self.mask_classes) and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError("mixing would label the partner's defect cells with the other picture's class; "
                             "set mixup_alpha: 0 and cutmix_alpha: 0 for design: dense or mask_classes")
        if self.design == "dense":
            defaults = type(self).model_fields
            if global_only := [name for name in _GLOBAL_ONLY if getattr(self, name) != defaults[name].default]:
                raise ValueError(f"design: dense has no {', '.join(global_only)}; remove them or use design: global")
            if self.mask_loss_weight <= 0:
                raise ValueError("design: dense learns from the defect masks; set mask_loss_weight > 0")
            if self.patch_size is not None and self.patch_size > self.image_size:
                raise ValueError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")
        elif self.arch == "convnet":
            raise ValueError("arch convnet is a dense trunk; set design: dense")
        elif self.patch_size is not None or self.head_refit_epochs:
            raise ValueError("patch_size and head_refit_epochs belong to design: dense")
        elif self.mask_classes and not self.mask_head:
            raise ValueError("mask_classes shapes the defect-map head; set mask_head: true")
        return self

    @property
    def uses_masks(self) -> bool:
        """Whether training reads the defect masks."""
        return self.mask_head or self.design == "dense"


class TrainParams(_Section):
    """The `train` section: which profile to use and the profiles themselves."""

    profile: Literal["auto"] | str = Field(
        "auto", description="'auto' = gpu when CUDA is available, else cpu"
    )
    profiles: dict[str, ProfileParams]
    seed: int | None = Field(None, description="defaults to base.seed")
    deterministic: bool = Field(True, description="deterministic algorithms (warn-only where none exists)")
    download_weights: bool = Field(False, description="allow downloading ImageNet weights when not cached")
    keep_checkpoint: bool = Field(False, description="keep the checkpoint folder after a finished run")

    @model_validator(mode="after")
    def _profiles_known(self) -> TrainParams:
        if self.profile != "auto" and self.profile not in self.profiles:
            raise ValueError(
                f"train.profile {self.profile!r} is not one of train.profiles: {sorted(self.profiles)}"
            )
        return self


def _section(raw: Any, name: str) -> Any:
    if isinstance(raw, Params):
        return getattr(raw, "model_extra", {}).get(name) if raw.model_extra else None
    if isinstance(raw, dict):
        return raw.get(name)
    return getattr(raw, name, None)


def _validate(model: type[BaseModel], value: Any, name: str) -> Any:
    try:
        return model.model_validate(value)
    except ValueError as exc:
        raise UsageError(
            f"params.yaml `{name}`: {first_validation_error(exc)}; fix that key (see components/training/params.py)"
        ) from exc


def augment_params(raw: Params | dict | None) -> AugmentParams:
    """The validated `augment` section (defaults where the section is missing)."""
    value = _section(raw, "augment") if raw is not None else None
    return _validate(AugmentParams, value or {}, "augment")


def train_params(raw: Params | dict | None) -> TrainParams:
    """The validated `train` section; a missing section is a usage error."""
    value = _section(raw, "train") if raw is not None else None
    if value is None:
        raise UsageError("params.yaml has no `train` section; add one with `train.profiles.cpu` and `.gpu`")
    return _validate(TrainParams, value, "train")
