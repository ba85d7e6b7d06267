"""params.yaml -> validated, frozen configuration models.

`params.yaml` is the only place for knobs. Each top-level section is a frozen pydantic model; an
unknown
key or a value out of range raises :class:`ConfigError` naming the key (``teacher.archh: unknown
key``).
Paths never live here: they come from argv, KFP artifacts or the model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from efcm import registry
from efcm.errors import EfcmError


class ConfigError(EfcmError, ValueError):
    """A configuration value is unknown, missing or out of range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _preset_defaults(data: Any, presets: dict[str, dict[str, Any]]) -> Any:
    """A section's raw `data` with its `preset`'s keys under the keys it gives itself (an unknown
    preset is left for the section's Literal to report)."""
    if isinstance(data, dict) and data.get("preset") in presets:
        return {**presets[data["preset"]], **data}
    return data


class DatasetParams(_Section):
    """What the labels mean: class names in a fixed order (index = class id)."""

    classes: tuple[str, ...] = ("normal", "tumour")

    @model_validator(mode="after")
    def _two_or_more(self) -> DatasetParams:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be >= 2 distinct names, got {list(self.classes)}")
        return self


class DemoDataParams(_Section):
    """The embedded synthetic demo dataset."""

    slides: int = Field(16, ge=2)
    size: int = Field(4096, ge=512, description="level-0 width and height in px")
    mpp: float = Field(0.5, gt=0)
    levels: int = Field(3, ge=1, le=8)
    level_factor: int = Field(4, ge=2)
    slides_per_case: int = Field(2, ge=1)
    tumour_fraction: float = Field(0.5, gt=0, lt=1, description="share of slides labelled tumour")


class ImageDemoParams(_Section):
    """The synthetic image demo sets (`efcm demo-data --kind fundus|cxr`)."""

    images: int = Field(64, ge=4)
    size: int = Field(256, ge=64, le=4096, description="side of the written images, px")
    images_per_case: int = Field(2, ge=1, description="images of one patient (eyes, views)")
    positive_fraction: float = Field(
        0.5, gt=0, lt=1, description="fundus: share of images with lesions; cxr: of each finding"
    )
    unlabelled: int = Field(8, ge=0, description="the first this many images have no label")


class ImageHeadParams(_Section):
    """The linear heads of the image-level strategies on features (`efcm.training.image_heads`):
    the teacher's linear probe, and the head retrained on the student's features. As in the
    RETFound / MRM linear-probe protocol: features standardised with the training split's
    mean and std, one linear layer, early stopping on the validation loss (best epoch kept)."""

    epochs: int = Field(200, ge=1)
    min_epochs: int = Field(10, ge=0)
    patience: int = Field(20, ge=1, description="epochs without a better validation loss")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1)


class ImageFinetuneParams(_Section):
    """End-to-end fine-tuning of the distilled student with a linear head per fold
    (`efcm.training.image_finetune`): the student's stem and first `freeze_stages` stages and
    every BatchNorm statistic frozen, AdamW with the student at `lr x backbone_lr_factor`,
    augmentation as the task's `image.orientation` allows, early stopping on the validation loss.
    The teacher's fine-tune (`image.teacher_finetune`) takes the same settings (a ViT's stages:
    its blocks)."""

    epochs: int = Field(20, ge=1)
    min_epochs: int = Field(3, ge=0)
    patience: int = Field(5, ge=1, description="epochs without a better validation loss")
    lr: float = Field(1e-3, gt=0, description="the head's learning rate")
    backbone_lr_factor: float = Field(0.1, gt=0, le=1, description="student lr = lr x this")
    weight_decay: float = Field(1e-4, ge=0)
    freeze_stages: int = Field(2, ge=0, description="student stem + this many stages frozen")
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0, description="DataLoader workers reading the images")
    augment: bool = True
    colour_jitter: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="brightness gain +-this (per channel unless image.channels is grey)",
    )


# Image task presets: the preprocessing and label space of the two demo tasks (and of the
# RETFound / MRM settings they stand for). Keys given next to `preset` override it.
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    # colour fundus photographs: crop to the circular field of view, keep colour
    "fundus": {
        "classes": ("no_lesion", "lesion"),
        "multi_label": False,
        "crop": "fundus",
        "resize": "pad",
        "channels": "rgb",
        "orientation": "free",  # a fundus has no up: any flip or quarter turn
    },
    # chest X-rays (DICOM or PNG): grey to 3 channels, the whole image padded to a square
    "cxr": {
        "classes": ("effusion", "nodule", "cardiomegaly"),
        "multi_label": True,
        "crop": "none",
        "resize": "pad",
        "channels": "grey",
        "orientation": "upright",  # the neck at the top: a left-right mirror only
    },
}


DEMO_KINDS: tuple[str, ...] = ("slides", *IMAGE_PRESETS)  # efcm demo-data --kind


class ImageParams(_Section):
    """The image-level task (issue 16): its classes, and how every image is preprocessed into the
    uint8 RGB square the encoders take (`efcm.images.preprocess`). A `preset` (IMAGE_PRESETS)
    sets the task's keys; keys given next to it override them."""

    preset: Literal["fundus", "cxr"] | None = None
    classes: tuple[str, ...] = ("negative", "positive")
    multi_label: bool = Field(False, description="labels name several classes, 'a|b'")
    none_label: str = Field(
        "no_finding", min_length=1, description="multi-label: the label of an image with no class"
    )
    size: int = Field(224, ge=16, le=4096, description="side of the preprocessed square, px")
    resize: Literal["crop", "pad", "stretch"] = Field(
        "crop",
        description="crop: shorter side to `size`, centre crop; pad: longer side to `size`, "
        "black padding; stretch: both sides to `size`",
    )
    crop: Literal["none", "fundus"] = Field(
        "none", description="fundus: crop to the circular field of view first"
    )
    fov_threshold: int = Field(
        20, ge=1, le=254, description="fundus: red/brightness level (0-255) of the field of view"
    )
    channels: Literal["rgb", "grey"] = Field(
        "rgb", description="rgb: colour kept (grey replicated); grey: luma replicated to 3 channels"
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="normalisation the encoder applies (null: the encoder's own)"
    )
    std: tuple[float, float, float] | None = None
    orientation: Literal["free", "upright", "fixed"] = Field(
        "upright",
        description="the fine-tuning's geometric augmentation: free: any flip or quarter turn; "
        "upright: a left-right mirror only (no vertical flip, no turn); fixed: none",
    )
    max_pixels: int = Field(
        100_000_000, ge=1024, description="refuse an image with more pixels (status too_large)"
    )
    min_side: int = Field(16, ge=1, description="refuse an image smaller (status too_small)")
    fail_on: Literal["all", "any", "never"] = Field(
        "all", description="the batch fails (exit 1) when all / any / never an image fails"
    )
    demo: ImageDemoParams = ImageDemoParams()
    head: ImageHeadParams = ImageHeadParams()
    folds: int = Field(5, ge=2, description="patient-level folds of the image strategies")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each fold's training cases for early stopping"
    )
    strategies: Literal["auto"] | tuple[str, ...] = Field(
        "auto",
        description="the image strategies compared (efcm.registry.IMAGE_STRATEGIES): auto, every "
        "available one that applies to distill.method, or a list",
    )
    export_strategy: str = Field(
        registry.DEFAULT_IMAGE_EXPORT,
        description="the image strategy a package would ship, the one the gate judges",
    )
    finetune: ImageFinetuneParams = ImageFinetuneParams()
    teacher_finetune: bool = Field(
        False,
        description="efcm train-mil --kind image also fine-tunes the teacher end to end per fold "
        "(image.finetune's settings, the student fine-tune's splits) into <out>/finetune: the "
        "evaluation's teacher.finetune row; reads the images (hours per fold for a ViT-L on a CPU)",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return _preset_defaults(data, IMAGE_PRESETS)

    @model_validator(mode="after")
    def _label_space(self) -> ImageParams:
        least = 1 if self.multi_label else 2
        if len(self.classes) < least or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be >= {least} distinct names, got {list(self.classes)}")
        bad = [c for c in self.classes if not c or "|" in c or c != c.strip()]
        if bad:
            raise ValueError(f"classes {bad}: a class name is not empty and has no '|' or spaces")
        if self.multi_label and self.none_label in self.classes:
            raise ValueError(f"none_label {self.none_label!r} is also a class")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are given together (or both null: the encoder's)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {list(self.std)}")
        named = [] if self.strategies == "auto" else list(self.strategies)
        if self.strategies != "auto" and (not named or len(set(named)) != len(named)):
            raise ValueError(f"strategies must be distinct and not empty, got {named}")
        unknown = [s for s in [*named, self.export_strategy] if s not in registry.IMAGE_STRATEGIES]
        if unknown:
            raise ValueError(
                f"unknown image strategies {unknown}: use 'auto' or a list of "
                f"{list(registry.IMAGE_NAMES)}"
            )
        return self

    def encoder_spec(self, encoder: EncoderParams) -> EncoderParams:
        """The encoder's settings for images of this task: the whole preprocessed image resized
        to the encoder's input (no centre crop), normalised with this task's mean/std when set."""
        update: dict[str, Any] = {"resize": encoder.input_size}
        if self.mean is not None:
            update.update(mean=self.mean, std=self.std)
        return encoder.model_copy(update=update)


# Tissue presets: CLAM's segmentation settings, with area filters in units of the reference patch
# (the configured patch at level 0, not CLAM's fixed 512 level-0 px), so that small slides,
# biopsies and TMA cores keep their tissue. Keys given next to `preset` override it.
TISSUE_PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "sthresh": 8,
        "mthresh": 7,
        "close": 4,
        "use_otsu": False,
        "min_area": 4.0,
        "min_hole_area": 1.0,
        "max_n_holes": 8,
    },
    "tcga": {
        "sthresh": 8,
        "mthresh": 7,
        "close": 4,
        "use_otsu": False,
        "min_area": 16.0,
        "min_hole_area": 4.0,
        "max_n_holes": 8,
    },
    "biopsy": {
        "sthresh": 15,
        "mthresh": 11,
        "close": 2,
        "use_otsu": False,
        "min_area": 1.0,
        "min_hole_area": 1.0,
        "max_n_holes": 2,
    },
}


class TissueParams(_Section):
    """CLAM-equivalent tissue segmentation on a thumbnail (see efcm.slides.tissue)."""

    preset: Literal["default", "tcga", "biopsy"] = "default"
    seg_patch_px: float = Field(
        16.0, ge=2, description="thumbnail px per patch side: sets the segmentation scale"
    )
    max_thumbnail_px: int = Field(
        4096, ge=256, description="longest thumbnail side, whatever the slide"
    )
    sthresh: int = Field(8, ge=0, le=255, description="saturation threshold (unless use_otsu)")
    mthresh: int = Field(7, ge=1, description="median blur kernel (odd)")
    use_otsu: bool = False
    close: int = Field(4, ge=0, description="morphological closing kernel, px of the thumbnail")
    min_area: float = Field(4.0, ge=0, description="min tissue area, in reference patch areas")
    min_hole_area: float = Field(1.0, ge=0, description="min hole area, in reference patch areas")
    max_n_holes: int = Field(8, ge=0)
    filter_ink: bool = Field(True, description="remove pen marks (green, blue, red, black ink)")
    black_value: int = Field(50, ge=0, le=255, description="HSV value below this is not tissue")
    white_value: int = Field(235, ge=0, le=255, description="brighter and grey is not tissue")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "default")
        if name not in TISSUE_PRESETS:
            return data  # the Literal reports the bad name
        return {**TISSUE_PRESETS[name], **data}

    @model_validator(mode="after")
    def _odd_blur(self) -> TissueParams:
        if self.mthresh % 2 == 0:
            raise ValueError(f"mthresh must be odd, got {self.mthresh}")
        return self


class PatchParams(_Section):
    """Patch grid: size and step in px at `target_mpp`, containment test, tissue fraction."""

    target_mpp: float = Field(0.5, gt=0)
    patch_size: int = Field(256, ge=16)
    step: int = Field(256, ge=1)
    contour_fn: Literal["four_pt", "four_pt_hard", "center"] = "four_pt"
    min_tissue_fraction: float = Field(0.0, ge=0, le=1)
    default_mpp: float | None = Field(None, gt=0, description="used when a slide has no mpp")
    max_upsample: float = Field(
        2.0, ge=1, description="refuse slides whose mpp is coarser than target_mpp x this"
    )
    fail_on: Literal["all", "any", "never"] = Field(
        "all", description="the batch fails (exit 1) when all / any / never a slide fails"
    )
    tissue: TissueParams = TissueParams()


# Encoder presets: the teachers and students the methods are specified with. Keys given next to
# `preset` override it (e.g. `weights`, the checkpoint).
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # BROW: ViT-B/16, CLS token (timm's default pooling), 768-d; 256 px read, centre-crop 224
    "brow": {"arch": "vit_base_patch16_224", "input_size": 224, "resize": 256},
    # UNI: ViT-L/16, 1024-d, layer-scale init as released
    "uni": {
        "arch": "vit_large_patch16_224",
        "input_size": 224,
        "resize": 224,
        "model_kwargs": {"init_values": 1e-5},
    },
    # the MCM-KD teacher: EfficientNetV2-L, 1280-d
    "efficientnetv2_l": {"arch": "tf_efficientnetv2_l", "input_size": 224, "resize": 224},
    "resnet18": {"arch": "resnet18", "input_size": 224, "resize": 224},
    # CLAM's encoder: ResNet-50 cut after layer3, average-pooled, 1024-d
    "resnet50_trunc": {"arch": "resnet50_trunc", "input_size": 224, "resize": 224},
    # RETFound (retinal images): ViT-L/16, 1024-d. Its fine-tuning code (MAE's models_vit.py,
    # global_pool=True) averages the patch tokens (the class token left out) and applies a
    # LayerNorm `fc_norm` to the mean; the final `norm` is not used. timm's global_pool="avg"
    # builds exactly that (norm an Identity, fc_norm after the pool).
    "retfound": {
        "arch": "vit_large_patch16_224",
        "input_size": 224,
        "resize": 224,
        "model_kwargs": {"global_pool": "avg"},
    },
    # MRM (chest X-rays): ViT-B/16, 768-d. MAE-style pretraining (masked image and report
    # modelling) gives the class token no objective of its own, so the features are RETFound's
    # global pool of the patch tokens too (MAE's fine-tuning default, which MRM's builds on).
    "mrm": {
        "arch": "vit_base_patch16_224",
        "input_size": 224,
        "resize": 224,
        "model_kwargs": {"global_pool": "avg"},
    },
}


class EncoderParams(_Section):
    """A patch encoder built by timm (`arch`, any timm name) or a `preset` (see ENCODER_PRESETS).
    `weights` is a local path or gs:// URI of a checkpoint, or null (random init, demo only).
    Keys given next to `preset` override its keys; `model_kwargs` merge with the preset's."""

    preset: (
        Literal["brow", "uni", "efficientnetv2_l", "resnet18", "resnet50_trunc", "retfound", "mrm"]
        | None
    ) = None
    arch: str
    weights: str | None = None
    input_size: int = Field(224, ge=16)
    resize: int | None = Field(
        None, ge=16, description="resize the read patch to this before the centre crop"
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        merged = _preset_defaults(data, ENCODER_PRESETS)
        preset = ENCODER_PRESETS.get(data.get("preset")) if isinstance(data, dict) else None
        if preset and isinstance(data.get("model_kwargs"), dict):
            # keys merge: `model_kwargs: {img_size: 448}` keeps the preset's pooling
            merged["model_kwargs"] = {**preset.get("model_kwargs", {}), **data["model_kwargs"]}
        return merged


class ExtractParams(_Section):
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    float16: bool = False


class StoreParams(_Section):
    """The patch-shard store (efcm.io.store): patch pixels written once by teacher extraction,
    then streamed by distillation and read through its index by ETC, student extraction and the
    export, instead of opening the slides."""

    enabled: bool = Field(False, description="write the store and read pixels from it")
    format: Literal["jpeg", "webp", "png"] = Field("jpeg", description="png is lossless")
    quality: int = Field(90, ge=1, le=100, description="jpeg / webp quality")
    shuffle_buffer: int = Field(
        4096, ge=1, description="samples in distillation's shuffle buffer (per rank)"
    )
    interleave: int = Field(4, ge=1, description="shards (slides) each rank streams at once")
    uri: str = Field(
        "",
        description="where the shard tars go: '' beside their indexes in the teacher extraction's "
        "output (store/; on KFP with a gs:// pipeline root, <output artifact>.shards/), or a "
        "folder or gs:// prefix; the output then holds the indexes only",
    )
    fidelity_patches: int = Field(
        16,
        ge=0,
        description="patches per slide (at most 5% of its patches) whose features, slide vs "
        "shard pixels, are compared",
    )


class FpdParams(_Section):
    """Feature Projection Distillation: frozen shallow student CNN + trainable TransScan."""

    shallow_stage: int = Field(
        3, ge=1, le=5, description="the student's feature stage the projection reads (timm index)"
    )
    embed_dim: int = Field(256, ge=8)
    depth: int = Field(2, ge=1, description="transformer layers over the spatial tokens")
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    sk_reduction: int = Field(4, ge=1, description="channel reduction of the branch attention")


class McmParams(_Section):
    """Masked Context Modelling: s x s windows of neighbouring patches, some masked."""

    window: int = Field(4, ge=2, description="s: windows of s x s neighbouring patches")
    mask_ratio: float = Field(0.5, gt=0, lt=1)
    min_valid: float = Field(0.5, gt=0, le=1, description="share of a window that must be tissue")
    embed_dim: int = Field(256, ge=8)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)


class DistillParams(_Section):
    method: Literal["vfd", "fpd", "mcm"] = "vfd"
    epochs: int = Field(2, ge=1, description="MCM-KD is specified with 1")
    batch_size: int = Field(64, ge=1, description="patches per step (MCM: windows per step)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear warm-up, then cosine")
    loss: Literal["mse", "l1", "cosine", "mse_cosine"] = Field(
        "mse_cosine", description="VFD and FPD (MCM-KD uses L1 on the masked positions)"
    )
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    val_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of slides held out for validation"
    )
    num_workers: int = Field(0, ge=0)
    checkpoint_steps: int = Field(
        200,
        ge=0,
        description="also checkpoint every this many optimiser steps (0: epoch ends only)",
    )
    fpd: FpdParams = FpdParams()
    mcm: McmParams = McmParams()


class TrainMilParams(_Section):
    model: Literal["clam_sb", "clam_mb"] = "clam_sb"
    instance_loss: Literal["ce", "svm"] = Field(
        "ce", description="instance clustering loss: cross-entropy or smooth top-1 SVM"
    )
    subtyping: bool = Field(
        False, description="also pseudo-label out-of-class instances (for subtype problems)"
    )
    folds: int = Field(3, ge=2)
    epochs: int = Field(40, ge=1)
    min_epochs: int = Field(10, ge=0)
    patience: int = Field(10, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    hidden: int = Field(128, ge=8)
    attn_dim: int = Field(64, ge=4)
    dropout: float = Field(0.25, ge=0, lt=1)
    bag_weight: float = Field(0.7, ge=0, le=1)
    k_sample: int = Field(8, ge=1)
    val_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of training cases used for early stopping"
    )


class IbParams(_Section):
    """The variational information-bottleneck MIL head that picks each slide's top-K patches."""

    k: int = Field(512, ge=1, description="patches kept per slide (all when a slide has fewer)")
    temperature: float = Field(0.1, gt=0, description="relaxed-Bernoulli temperature")
    samples: int = Field(10, ge=1, description="mask samples per bag and step")
    prior: float = Field(0.1, gt=0, lt=1, description="prior keep-rate of an instance")
    beta: float = Field(0.1, ge=0, description="weight of the information (KL) loss")
    hidden: int = Field(128, ge=8)
    epochs: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)


class EtcParams(_Section):
    """End2end Train CLAM: the student and a CLAM fine-tuned on the IB top-K bags."""

    epochs: int = Field(2, ge=1)
    lr: float = Field(2e-4, gt=0, description="the CLAM head's learning rate")
    backbone_lr_factor: float = Field(0.1, gt=0, le=1, description="student lr = lr x this")
    weight_decay: float = Field(1e-4, ge=0)
    freeze_stages: int = Field(2, ge=0, description="student stem + this many stages frozen")
    accumulate: int = Field(1, ge=1, description="bags per optimiser step")
    chunk: int = Field(64, ge=1, description="patches per checkpointed forward chunk")
    augment: bool = True
    colour_jitter: float = Field(0.05, ge=0, lt=1)


class MilParams(_Section):
    """Which slide-level strategies the run compares (the table is `efcm.registry`): `auto`, every
    strategy that applies to `distill.method` (the report says which were left out and why), or an
    explicit list, where a strategy that does not apply is an error."""

    strategies: Literal["auto"] | tuple[str, ...] = "auto"
    etc: EtcParams = EtcParams()

    @model_validator(mode="after")
    def _known(self) -> MilParams:
        if self.strategies == "auto":
            return self
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be distinct and not empty, got {self.strategies}")
        unknown = [s for s in self.strategies if s not in registry.STRATEGIES]
        if unknown:
            raise ValueError(
                f"unknown strategies {unknown}: use 'auto' or a list of {list(registry.NAMES)}"
            )
        return self


class EvaluateParams(_Section):
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)


class ExportParams(_Section):
    """The package: its KServe model name, and the strategy it ships (one the run compares). The
    package is the k fold models of that strategy as one ensemble (see `efcm.training.export`)."""

    model_name: str = Field("efcm", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    strategy: str = Field(
        registry.DEFAULT_EXPORT, description="the strategy whose fold models are shipped"
    )
    runtimes: list[Literal["onnx", "int8"]] = Field(
        ["onnx", "int8"],
        description="the CPU runtimes the package carries besides torch (efcm.runtimes); each is "
        "checked for parity with the evaluated model, and export refuses one that misses it",
    )
    calibration_patches: int = Field(
        512,
        ge=16,
        description="patches from the training slides (images, for an image task) that calibrate "
        "the INT8 student",
    )
    parity_max_patches: int = Field(
        512, ge=16, description="the most patches of each evaluation slide the parity check reads"
    )
    parity_max_images: int = Field(
        256, ge=1, description="image task: the most evaluation images the parity check reads"
    )

    @model_validator(mode="after")
    def _known(self) -> ExportParams:
        registry.get(self.strategy)
        return self


class DeployParams(_Section):
    """The promotion gate (efcm.evaluation.gate), a non-inferiority rule on the exported package:
    deploy only when the lower bound of the paired (case-level bootstrap) interval of student minus
    teacher AUROC is >= -`max_auc_drop`, and the student's AUROC is > `min_auc`."""

    max_auc_drop: float = Field(0.05, ge=0, le=1)
    min_auc: float = Field(0.5, ge=0, le=1)


class PipelineParams(_Section):
    """Kubeflow only (dvc repro runs every slide in one process): slides per shard of the
    patch -> teacher-extract fan-out, how many shards run at once (fixed at compile time: KFP
    writes it into the compiled pipeline), and where the GPU stages run."""

    shard_size: int = Field(64, ge=1)
    parallelism: int = Field(4, ge=1)
    distill_gpus: int = Field(
        1,
        ge=1,
        description="GPUs of the distill pod (per node): one DDP process each (compile time)",
    )
    distill_nodes: int = Field(
        1,
        ge=1,
        description="> 1: distill as a Kubeflow Trainer TrainJob on that many GPU nodes (compile "
        "time)",
    )
    etc_gpus: int = Field(
        1,
        ge=1,
        description="GPUs of each strategy pod: ETC runs one DDP process each (mil.etc.accumulate "
        "must divide by it), Reuse and Retrain one process (compile time)",
    )
    gpu_accelerator_type: str = Field("nvidia.com/gpu", min_length=1)
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    )


class Params(_Section):
    """All of params.yaml."""

    @model_validator(mode="after")
    def _strategies_apply(self) -> Params:
        # Rules across sections hold between the sections given (a stage gets only its own; see
        # `params_for_stage`), so a section a stage does not read never fails it.
        given = self.model_fields_set
        if {"distill", "mil"} <= given:
            run, _ = registry.resolve(self.distill.method, self.mil.strategies)
            if "export" in given and self.export.strategy not in run:
                raise ValueError(
                    f"export.strategy {self.export.strategy!r} is not one of the strategies this "
                    f"run compares {run} (mil.strategies {_show(self.mil.strategies)}, "
                    f"distill.method {self.distill.method!r})"
                )
        if {"distill", "image"} <= given:
            run, _ = registry.resolve_image(self.distill.method, self.image.strategies)
            if self.image.export_strategy not in run:
                raise ValueError(
                    f"image.export_strategy {self.image.export_strategy!r} is not one of the "
                    f"image strategies this run compares {run} (image.strategies "
                    f"{_show(self.image.strategies)}, distill.method {self.distill.method!r})"
                )
        if {"mil", "pipeline"} <= given and self.mil.etc.accumulate % self.pipeline.etc_gpus:
            raise ValueError(
                f"mil.etc.accumulate {self.mil.etc.accumulate} does not divide by "
                f"pipeline.etc_gpus {self.pipeline.etc_gpus}: the ETC processes share each "
                "optimiser step's bags equally"
            )
        return self

    seed: int = 0
    dataset: DatasetParams = DatasetParams()
    demo_data: DemoDataParams = DemoDataParams()
    patch: PatchParams = PatchParams()
    teacher: EncoderParams = EncoderParams(arch="vit_small_patch16_224")
    student: EncoderParams = EncoderParams(arch="resnet18")
    extract: ExtractParams = ExtractParams()
    store: StoreParams = StoreParams()
    distill: DistillParams = DistillParams()
    train_mil: TrainMilParams = TrainMilParams()
    ib: IbParams = IbParams()
    mil: MilParams = MilParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    deploy: DeployParams = DeployParams()
    pipeline: PipelineParams = PipelineParams()
    image: ImageParams = ImageParams()


SECTIONS: tuple[str, ...] = tuple(Params.model_fields)


def _show(strategies: str | tuple[str, ...]) -> str:
    return strategies if isinstance(strategies, str) else str(list(strategies))


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif key == "<root>":  # a rule across sections: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid configuration in {source}: " + "; ".join(lines)


# The params sections each stage reads: the one table that dvc.yaml (rendered from it by
# pipelines/render_dvc.py), the KFP components (each takes exactly these as parameters, a test
# checks) and the CLI share. A stage gets only its sections (`params_for_stage`, `for_stage`):
# reading another raises, so a section a stage forgets fails loudly instead of taking a default.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "demo_data": ("seed", "dataset", "demo_data"),
    "image_demo_data": ("seed", "image"),  # efcm demo-data --kind fundus|cxr
    "image_resolve_dataset": ("image",),  # the image Kubeflow pipeline's manifest import
    "resolve_dataset": ("dataset",),
    "patch": ("dataset", "patch"),
    "gather": ("dataset", "patch"),
    "extract": ("seed", "dataset", "teacher", "extract", "store"),
    "distill": ("seed", "dataset", "student", "distill", "store"),
    "image_extract": ("seed", "image", "teacher", "extract"),  # efcm extract --kind image
    "image_distill": ("seed", "image", "student", "distill"),  # efcm distill --kind image
    "image_splits": ("seed", "image"),  # efcm splits --kind image
    # efcm train-mil --kind image: the teacher's probe (and fine-tune: image.teacher_finetune)
    "image_train_mil": ("seed", "image", "teacher"),
    "image_strategy": ("seed", "image", "distill"),  # efcm strategy NAME --kind image
    "plan_image_strategies": ("image", "distill"),  # the image pipeline's ParallelFor items
    "image_evaluate": ("seed", "image", "teacher", "distill", "extract", "evaluate"),
    "image_gate": ("image", "distill", "deploy"),  # efcm gate --evaluation
    "image_export": ("seed", "image", "teacher", "distill", "export"),  # efcm export --kind image
    "splits": ("seed", "dataset", "train_mil"),
    "train_mil": ("seed", "dataset", "train_mil"),
    "plan_strategies": ("distill", "mil"),
    "strategy": ("seed", "dataset", "distill", "train_mil", "ib", "mil", "extract", "store"),
    "evaluate": ("seed", "dataset", "teacher", "distill", "mil", "extract", "evaluate"),
    "export": ("dataset", "patch", "teacher", "distill", "mil", "export", "store"),
    "report": ("dataset",),
    "gate": ("deploy",),
    "deploy": ("export",),
}


class _Unset:
    """A params section the current stage does not receive: any use of it raises ConfigError."""

    def __init__(self, section: str, stage: str) -> None:
        self._where = (section, stage)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        section, stage = self._where
        raise ConfigError(
            f"stage {stage!r} read {section}.{key}, but {section!r} is not one of its params "
            f"sections {list(STAGE_SECTIONS[stage])} (add it to efcm.config.STAGE_SECTIONS)"
        )

    def __repr__(self) -> str:
        return f"<{self._where[0]}: not a section of stage {self._where[1]!r}>"


def for_stage(params: Params, stage: str) -> Params:
    """`params` with only the sections of `stage` (STAGE_SECTIONS); the others raise when read."""
    if stage not in STAGE_SECTIONS:
        raise ConfigError(f"unknown stage {stage!r}; known: {list(STAGE_SECTIONS)}")
    keep = set(STAGE_SECTIONS[stage])
    return params.model_copy(update={s: _Unset(s, stage) for s in SECTIONS if s not in keep})


def params_for_stage(stage: str, sections: dict[str, Any]) -> Params:
    """Validated params of one stage from exactly its sections (STAGE_SECTIONS[stage]), as a KFP
    component receives them (numbers that crossed a protobuf Struct are fixed as in
    `params_from_struct`). A missing or an extra section is a ConfigError naming it."""
    if stage not in STAGE_SECTIONS:
        raise ConfigError(f"unknown stage {stage!r}; known: {list(STAGE_SECTIONS)}")
    want = STAGE_SECTIONS[stage]
    missing = [s for s in want if s not in sections]
    extra = [s for s in sections if s not in want]
    if missing or extra:
        raise ConfigError(
            f"stage {stage!r} takes the params sections {list(want)}: "
            + "; ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"not its own {extra}" if extra else "",
                )
                if part
            )
        )
    return for_stage(params_from_struct(sections, stage), stage)


def params_from_dict(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping (the parsed params.yaml, or the sections a KFP component
    receives)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _json_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def params_from_struct(sections: dict[str, Any], source: str = "params") -> Params:
    """Params from sections that crossed a JSON / protobuf Struct boundary (KFP parameters).

    Such a boundary carries every number as a double: typed fields take 64.0 for 64 anyway, but
    free-form mappings (`model_kwargs`) would pass `img_size=64.0` on to timm, so integral floats
    are made ints first (a typed float field takes the int back as a float).
    """
    return params_from_dict(_json_numbers(sections), source)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: unknown keys, bad types or values out of range, each named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return params_from_dict(data, str(path))


def params_to_dict(params: Params, *, compact: bool = False) -> dict[str, Any]:
    """JSON-compatible dict of every section (tuples become lists).

    With `compact`, keys whose value is their preset's (tissue, teacher, student, image) are left
    out, so that the dict keeps the meaning of params.yaml: changing `preset` (in the KFP UI, say)
    changes them too.
    """
    data = {
        name: (value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
        for name in SECTIONS
        if not isinstance(value := getattr(params, name), _Unset)
    }
    if compact:
        tissue = data["patch"]["tissue"] if "patch" in data else None
        sections = [(tissue, TISSUE_PRESETS)]
        sections += [(data.get(name), ENCODER_PRESETS) for name in ("teacher", "student")]
        sections.append((data.get("image"), IMAGE_PRESETS))
        for section, presets in sections:
            if section is None:
                continue
            preset = presets.get(section.get("preset"), {})
            for key, value in preset.items():
                if section.get(key) == (list(value) if isinstance(value, tuple) else value):
                    del section[key]
    return data
