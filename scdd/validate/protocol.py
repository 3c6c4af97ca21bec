"""The validation protocol, resolved from the spec: every None takes the default of its mode and preset.

Presets (`validate.preset`), each applied identically to the distilled set and the random-real baseline:

quick  today's short demo protocol.
       kd:   ConvNet student with BatchNorm, soft labels from the relabel teacher at temperature T,
             AdamW lr 1e-3, wd 0.01, CutMix, 100 epochs, batch 64, cosine to 0, no weight EMA.
       hard: ConvNet with instance norm (DC / DSA / IDC papers), cross-entropy on the class labels, SGD
             lr 0.01, momentum 0.9, wd 5e-4, 300 epochs, batch 256.
long   the papers' long student schedule (RDED arXiv 2312.03526, EDC arXiv 2404.13733): 300 epochs, the
       batch set by the set's size (10 / 50 / 100 images at IPC 1 / 10 / 50 of a 10-class set, as RDED),
       a cosine that only decays to half (RDED), and the weights' EMA is the student tested (EDC).
       Where it differs from them: RDED and EDC use ResNet-18 students at 32 px with random-resized-crop
       scale (0.08, 1); ours is the ConvNet at 28 px with scale (0.5, 1); EDC trains 1000 epochs at batch
       25 and adds its own augmentations; we keep CutMix (RDED) and AdamW 1e-3 for both.
The default student follows the resolution (`student_for_resolution`): the ConvNets above below 32 px, a
ResNet-18 with the small stem from 32 to 64 px (kd), a ResNet-18 above 64 px.
Where `hard` differs from the DC papers: the schedule is cosine rather than a step at half-time, and
the augmentation is random-resized-crop + flip (DSA also uses colour, cutout, scale and rotation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import ValidateSpec

BY_SET_SIZE = 0  # batch_size placeholder: `batch_for_set` decides

PRESETS = {
    ("quick", "kd"): dict(student_arch="convnet", epochs=100, batch_size=64, optimizer="adamw", lr=1e-3,
                          weight_decay=0.01, mix="cutmix", ema_decay=0.0, schedule_span=1.0),
    ("quick", "hard"): dict(student_arch="convnet_in", epochs=300, batch_size=256, optimizer="sgd", lr=0.01,
                            weight_decay=5e-4, mix="none", ema_decay=0.0, schedule_span=1.0),
    ("long", "kd"): dict(student_arch="convnet", epochs=300, batch_size=BY_SET_SIZE, optimizer="adamw", lr=1e-3,
                         weight_decay=0.01, mix="cutmix", ema_decay=0.99, schedule_span=2.0),
    ("long", "hard"): dict(student_arch="convnet_in", epochs=300, batch_size=BY_SET_SIZE, optimizer="sgd", lr=0.01,
                           weight_decay=5e-4, mix="none", ema_decay=0.99, schedule_span=2.0),
}


# Fields added after reports and cache keys were published: dropped from `Protocol.to_dict` at these values.
NEW_FIELD_DEFAULTS = dict(crop="resized", momentum=0.9, nesterov=True, decay_norm_and_bias=True,
                          warmup_epochs=0, schedule_unit="step", temperature_squared=True)


def batch_for_set(images: int) -> int:
    """RDED's batch sizes by set size: half the set, at least 10 and at most 100 (10 / 50 / 100 for a
    10-class set at IPC 1 / 10 / 50)."""
    return min(100, max(10, images // 2))


@dataclass(frozen=True)
class Protocol:
    mode: str
    preset: str
    student_arch: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    temperature: float
    mix: str
    mix_alpha: float
    crop_scale: tuple[float, float]
    ema_decay: float  # 0: the last weights are tested
    schedule_span: float  # 1: cosine to 0; 2: cosine to half the peak (see scdd.optim.cosine_factor)
    crop: str = "resized"  # resized (random-resized-crop) or padded (zero-pad, random crop); then flip
    crop_padding: int = 4  # crop padded: pixels of zero padding on each side
    momentum: float = 0.9  # optimizer sgd
    nesterov: bool = True  # optimizer sgd
    decay_norm_and_bias: bool = True  # false: no weight decay on parameters of fewer than 2 dims (norms, biases)
    warmup_epochs: int = 0  # linear warm-up before the cosine
    schedule_unit: str = "step"  # the schedule is stepped per batch (step) or per epoch (epoch)
    temperature_squared: bool = True  # kd: the KL times T^2

    def to_dict(self) -> dict:
        """The protocol as the report's StudentProtocol. Fields that do not apply are dropped (temperature and
        temperature_squared in hard mode, momentum/nesterov unless sgd, crop_padding unless padded), and so are
        the fields added with issue 26 where they are at their defaults: the dict of a protocol that does not set
        them is the one it always was (DD-Ranking's full-data cache key hashes it)."""
        data = asdict(self)
        if self.mode == "hard":
            data.pop("temperature")
            data.pop("temperature_squared")
        if self.optimizer != "sgd":
            data.pop("momentum")
            data.pop("nesterov")
        if self.crop != "padded":
            data.pop("crop_padding")
        for name, default in NEW_FIELD_DEFAULTS.items():
            if name in data and data[name] == default:
                data.pop(name)
        return data


def student_for_resolution(preset_arch: str, mode: str, image_size: int | None) -> str:
    """The default student at a resolution: the preset's ConvNet below 32 px (Fashion-MNIST's 28); a ResNet-18
    with the small (CIFAR) stem from 32 to 64 px in kd (hard keeps the DC papers' ConvNet-IN there); a
    ResNet-18 above 64 px (a ConvNet's linear head alone would have 100 M parameters at 224 px, 1000 classes)."""
    if image_size is None or image_size < 32:
        return preset_arch
    if image_size > 64:
        return "resnet18"
    return "resnet18_small" if mode == "kd" else preset_arch


def resolve_protocol(spec: ValidateSpec, images: int, image_size: int | None = None) -> Protocol:
    """The protocol for a set of `images` images of `image_size` px (the batch size may depend on the first,
    the default student on the second)."""
    defaults = dict(PRESETS[(spec.preset, spec.mode)])
    defaults["student_arch"] = student_for_resolution(defaults["student_arch"], spec.mode, image_size)
    chosen = {key: getattr(spec, key) if getattr(spec, key) is not None else value for key, value in defaults.items()}
    if chosen["batch_size"] == BY_SET_SIZE:
        chosen["batch_size"] = batch_for_set(images)
    return Protocol(mode=spec.mode, preset=spec.preset, temperature=spec.temperature, mix_alpha=spec.mix_alpha,
                    crop_scale=tuple(spec.crop_scale), crop=spec.crop, crop_padding=spec.crop_padding,
                    momentum=spec.momentum, nesterov=spec.nesterov, decay_norm_and_bias=spec.decay_norm_and_bias,
                    warmup_epochs=spec.warmup_epochs, schedule_unit=spec.schedule_unit,
                    temperature_squared=spec.temperature_squared, **chosen)
