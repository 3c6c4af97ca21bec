"""The validation protocol, resolved from the spec: every None takes its mode's default.

kd   (SRe2L / SC-DD relabel): ConvNet student with BatchNorm, soft labels from the relabel teacher
     at temperature T, AdamW lr 1e-3, wd 0.01, CutMix, 100 epochs, batch 64.
hard (DC / DSA / IDC papers): ConvNet with instance norm, cross-entropy on the class labels, SGD
     lr 0.01, momentum 0.9, wd 5e-4, 300 epochs, batch 256. Where this differs from those papers:
     the schedule is cosine rather than a step at half-time, and the augmentation is
     random-resized-crop + flip (DSA also uses colour, cutout, scale and rotation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from api_schema import ValidateSpec

DEFAULTS = {
    "kd": dict(student_arch="convnet", epochs=100, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.01, mix="cutmix"),
    "hard": dict(student_arch="convnet_in", epochs=300, batch_size=256, optimizer="sgd", lr=0.01, weight_decay=5e-4, mix="none"),
}


@dataclass(frozen=True)
class Protocol:
    mode: str
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

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.mode == "hard":
            data.pop("temperature")
        return data


def resolve_protocol(spec: ValidateSpec) -> Protocol:
    defaults = DEFAULTS[spec.mode]
    chosen = {key: getattr(spec, key) if getattr(spec, key) is not None else value for key, value in defaults.items()}
    return Protocol(mode=spec.mode, temperature=spec.temperature, mix_alpha=spec.mix_alpha,
                    crop_scale=tuple(spec.crop_scale), **chosen)
