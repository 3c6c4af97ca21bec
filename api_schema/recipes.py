"""Named recipes: the reference scripts' values of SRe2L and SC-DD, one spec field `recipe` away.

Each recipe is a partial job spec (nested like the spec) that goes under the fields a spec sets: a field the spec
also gives overrides the recipe. `RECIPE_SOURCES` names, for every value, the reference file and line it comes
from (VILA-Lab/SRe2L; docs/recipes.md is generated from both).
"""

from __future__ import annotations

import copy
from typing import Any

IMAGENET_TEST_RESIZE = 256 / 224  # Resize(256) + CenterCrop(224)
_ONE_DRAW_PER_BATCH = {"per": "batch", "crop_ratio": [3 / 4, 4 / 3]}

RECIPES: dict[str, dict[str, Any]] = {
    "scdd-imagenet": {
        "method": "scdd",
        "dataset": {"image_size": 224, "normalization": "default", "test_resize_ratio": IMAGENET_TEST_RESIZE},
        "teacher": {"arch": "resnet50"},
        "recover": {
            "init": "noise", "iterations": 1000, "lr": 0.1, "r_bn": 0.01, "first_bn_multiplier": 10.0,
            "batch_size": 50, "tv_weight": 0.0, "l2_weight": 0.0, "stat_momentum": 0.0,
            "augment": {"crop": True, "crop_scale": [0.08, 1.0], "flip": True, "jitter": 32,
                        "jitter_direction": "forward", **_ONE_DRAW_PER_BATCH},
        },
        "validate": {
            "mode": "kd", "relabel_teacher": "supervised", "relabel_arch": "resnet18", "student_arch": "resnet18",
            "epochs": 300, "batch_size": 64, "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01,
            "decay_norm_and_bias": False, "warmup_epochs": 0, "schedule_unit": "epoch", "schedule_span": 1.0,
            "ema_decay": 0.0, "crop": "resized", "crop_scale": [0.08, 1.0], "mix": "cutmix", "mix_alpha": 1.0,
            "temperature": 20.0, "temperature_squared": False,
        },
        "resources": {"amp": "off"},
        "output": {"image_format": "jpeg", "jpeg_quality": 75},
    },
    "scdd-cifar100": {
        "method": "scdd",
        "dataset": {"normalization": "measured", "test_resize_ratio": 1.0},
        "teacher": {"arch": "resnet18_small"},
        "recover": {
            "init": "noise", "iterations": 1000, "lr": 0.4, "r_bn": 0.005, "first_bn_multiplier": 10.0,
            "batch_size": 100, "tv_weight": 0.0, "l2_weight": 0.0, "stat_momentum": 0.0,
            "augment": {"crop": False, "flip": False, "jitter": 4, "jitter_direction": "forward", "per": "batch"},
        },
        "validate": {
            "mode": "kd", "relabel_teacher": "supervised", "relabel_arch": "resnet18_small",
            "student_arch": "resnet18_small", "epochs": 200, "batch_size": 64, "optimizer": "adamw", "lr": 0.001,
            "weight_decay": 0.01, "decay_norm_and_bias": True, "warmup_epochs": 0, "schedule_unit": "epoch",
            "schedule_span": 3.0, "ema_decay": 0.0, "crop": "padded", "crop_padding": 4, "mix": "mixup",
            "mix_alpha": 0.8, "temperature": 30.0, "temperature_squared": False,
        },
        "resources": {"amp": "off"},
        "output": {"image_format": "jpeg", "jpeg_quality": 75},
    },
    "sre2l-imagenet": {
        "method": "sre2l",
        "dataset": {"image_size": 224, "normalization": "default", "test_resize_ratio": IMAGENET_TEST_RESIZE},
        "teacher": {"arch": "resnet18"},
        "recover": {
            "init": "noise", "iterations": 4000, "lr": 0.25, "r_bn": 0.01, "first_bn_multiplier": 10.0,
            "batch_size": 100, "tv_weight": 0.0, "l2_weight": 0.0, "stat_momentum": 0.0,
            "augment": {"crop": True, "crop_scale": [0.08, 1.0], "flip": True, "jitter": 32,
                        "jitter_direction": "forward", **_ONE_DRAW_PER_BATCH},
        },
        "validate": {
            "mode": "kd", "relabel_teacher": "recover", "student_arch": "resnet18", "epochs": 300, "batch_size": 1024,
            "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "decay_norm_and_bias": False, "warmup_epochs": 0,
            "schedule_unit": "epoch", "schedule_span": 1.0, "ema_decay": 0.0, "crop": "resized",
            "crop_scale": [0.08, 1.0], "mix": "cutmix", "mix_alpha": 1.0, "temperature": 20.0,
            "temperature_squared": False,
        },
        "resources": {"amp": "off"},
        "output": {"image_format": "jpeg", "jpeg_quality": 75},
    },
    "sre2l-tiny-imagenet": {
        "method": "sre2l",
        "dataset": {"normalization": "measured", "test_resize_ratio": 1.0},
        "teacher": {"arch": "resnet18_small", "epochs": 50, "batch_size": 256, "optimizer": "sgd", "lr": 0.2,
                    "weight_decay": 1e-4},
        "recover": {
            "init": "noise", "iterations": 4000, "lr": 0.1, "r_bn": 1.0, "first_bn_multiplier": 10.0,
            "batch_size": 100, "tv_weight": 0.0, "l2_weight": 0.0, "stat_momentum": 0.0,
            "augment": {"crop": True, "crop_scale": [0.08, 1.0], "flip": True, "jitter": 4, "jitter_direction": "both",
                        **_ONE_DRAW_PER_BATCH},
        },
        "validate": {
            "mode": "kd", "relabel_teacher": "recover", "student_arch": "resnet18_small", "epochs": 100,
            "batch_size": 256, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": False,
            "weight_decay": 1e-4, "decay_norm_and_bias": True, "warmup_epochs": 5, "schedule_unit": "epoch",
            "schedule_span": 1.0, "ema_decay": 0.0, "crop": "resized", "crop_scale": [0.08, 1.0], "mix": "none",
            "temperature": 20.0, "temperature_squared": True,
        },
        "resources": {"amp": "off"},
        "output": {"image_format": "jpeg", "jpeg_quality": 75},
    },
    "sre2l-cifar": {
        "method": "sre2l",
        "dataset": {"normalization": "measured", "test_resize_ratio": 1.0},
        "teacher": {"arch": "resnet18_small", "epochs": 200, "batch_size": 128, "optimizer": "sgd", "lr": 0.1,
                    "weight_decay": 5e-4},
        "recover": {
            "init": "noise", "iterations": 1000, "lr": 0.25, "r_bn": 0.01, "first_bn_multiplier": 10.0,
            "batch_size": 100, "tv_weight": 0.0, "l2_weight": 0.0, "stat_momentum": 0.0,
            "augment": {"crop": False, "flip": False, "jitter": 4, "jitter_direction": "forward", "per": "batch"},
        },
        "validate": {
            "mode": "kd", "relabel_teacher": "recover", "student_arch": "resnet18_small", "epochs": 400,
            "batch_size": 128, "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "decay_norm_and_bias": True,
            "warmup_epochs": 0, "schedule_unit": "epoch", "schedule_span": 1.0, "ema_decay": 0.0, "crop": "padded",
            "crop_padding": 4, "mix": "mixup", "mix_alpha": 0.8, "temperature": 30.0, "temperature_squared": False,
        },
        "resources": {"amp": "off"},
        "output": {"image_format": "jpeg", "jpeg_quality": 75},
    },
}

RECIPE_SUMMARIES: dict[str, str] = {
    "scdd-imagenet": "SC-DD on ImageNet-1K (`SCDD/imagenet_code`, the commands of `SCDD/README.md`): recover from a "
    "self-supervised ResNet-50 with a linear probe, students by online KD from a supervised ResNet-18.",
    "scdd-cifar100": "SC-DD on CIFAR-100 (`SCDD/cifar100_code`): recover from a self-supervised ResNet-18 (CIFAR stem) "
    "with a linear probe, no crop or flip; students by online KD with MixUp.",
    "sre2l-imagenet": "SRe2L on ImageNet-1K (`SRe2L/recover`, `SRe2L/relabel`, `SRe2L/validate`): recover from the "
    "supervised ResNet-18, students from its soft labels (FKD: `validate.store_soft_labels` keeps them).",
    "sre2l-tiny-imagenet": "SRe2L on Tiny-ImageNet (`SRe2L/*small_dataset/recover_tiny.*`; the student's script is "
    "the one `README_TINY.md` points to, zeyuanyin/tiny-imagenet `classification/train_kd.py`).",
    "sre2l-cifar": "SRe2L on CIFAR-100 (`SRe2L/*small_dataset`: `squeeze_cifar`, `recover_cifar`, `relabel_cifar`).",
}

_RECOVER_COMMON = {  # every recover script of the repository (one file cited per recipe below)
    "recover.init": "torch.randn: the images start as N(0, 1) noise in normalised space",
    "recover.tv_weight": "tv-l2 0 in the commands",
    "recover.l2_weight": "l2-scale 0 in the commands",
    "recover.stat_momentum": "the batch's own statistics are matched (no EMA)",
    "resources.amp": "fp32 (torch.float, no autocast)",
    "output.jpeg_quality": "pil_image.save without a quality: PIL's default 75",
}


def _sources(common: dict[str, str], **files: str) -> dict[str, str]:
    return {**common, **files}


_SCDD_IN = "SCDD/imagenet_code/recover/data_synthesis.py"
_SCDD_IN_POST = "SCDD/imagenet_code/post_train/train_kd.py"
_SCDD_C = "SCDD/cifar100_code/recover/recover_cifar100.py"
_SCDD_C_POST = "SCDD/cifar100_code/post_train/post_cifar100.py"
_SRE_IN = "SRe2L/recover/data_synthesis.py"
_SRE_SH = "SRe2L/recover/recover.sh"
_SRE_FKD = "SRe2L/validate/train_FKD.py"
_SRE_FKD_SH = "SRe2L/validate/train_FKD.sh"
_TINY = "SRe2L/*small_dataset/recover_tiny.py"
_TINY_SH = "SRe2L/*small_dataset/recover_tiny.sh"
_TINY_KD = "tiny-imagenet/classification/train_kd.py"
_TINY_KD_SH = "tiny-imagenet/script/train_kd.sh"
_CIFAR = "SRe2L/*small_dataset/recover_cifar.py"
_CIFAR_SH = "SRe2L/*small_dataset/recover_cifar.sh"
_CIFAR_RL = "SRe2L/*small_dataset/relabel_cifar.py"
_CIFAR_RL_SH = "SRe2L/*small_dataset/relabel_cifar.sh"
_CIFAR_SQ = "SRe2L/*small_dataset/squeeze_cifar.py"

# recipe -> dotted field -> "file:line" (VILA-Lab/SRe2L; `tiny-imagenet/...`: zeyuanyin/tiny-imagenet)
RECIPE_SOURCES: dict[str, dict[str, str]] = {
    "scdd-imagenet": _sources(
        _RECOVER_COMMON,
        **{"method": "SCDD/README.md:47-55", "dataset.image_size": f"{_SCDD_IN}:41",
           "dataset.normalization": "SCDD/imagenet_code/recover/utils.py:63-64",
           "dataset.test_resize_ratio": f"{_SCDD_IN_POST}:121-129", "teacher.arch": "SCDD/README.md:60",
           "recover.iterations": "SCDD/README.md:60", "recover.lr": "SCDD/README.md:60", "recover.r_bn": "SCDD/README.md:60",
           "recover.first_bn_multiplier": f"{_SCDD_IN}:198", "recover.batch_size": f"{_SCDD_IN}:189-190",
           "recover.augment.crop": f"{_SCDD_IN}:56-60", "recover.augment.crop_scale": f"{_SCDD_IN}:56-60",
           "recover.augment.flip": f"{_SCDD_IN}:58", "recover.augment.jitter": f"{_SCDD_IN}:195",
           "recover.augment.jitter_direction": f"{_SCDD_IN}:63-65", "recover.augment.per": f"{_SCDD_IN}:56-65",
           "recover.augment.crop_ratio": f"{_SCDD_IN}:56-60",
           "validate.mode": f"{_SCDD_IN_POST}:215-221", "validate.relabel_teacher": f"{_SCDD_IN_POST}:141-146",
           "validate.relabel_arch": "SCDD/README.md:72", "validate.student_arch": "SCDD/README.md:72",
           "validate.epochs": "SCDD/README.md:72", "validate.batch_size": "SCDD/README.md:72",
           "validate.optimizer": f"{_SCDD_IN_POST}:153-156", "validate.lr": f"{_SCDD_IN_POST}:54-57",
           "validate.weight_decay": f"{_SCDD_IN_POST}:54-57",
           "validate.decay_norm_and_bias": "SCDD/imagenet_code/post_train/utils.py:58-72",
           "validate.warmup_epochs": f"{_SCDD_IN_POST}:158-163", "validate.schedule_unit": f"{_SCDD_IN_POST}:158-160,184",
           "validate.schedule_span": f"{_SCDD_IN_POST}:158-160", "validate.ema_decay": f"{_SCDD_IN_POST}:179-184",
           "validate.crop": f"{_SCDD_IN_POST}:102-106", "validate.crop_scale": f"{_SCDD_IN_POST}:102-106",
           "validate.mix": "SCDD/README.md:72", "validate.mix_alpha": f"{_SCDD_IN_POST}:66",
           "validate.temperature": f"{_SCDD_IN_POST}:60-61", "validate.temperature_squared": f"{_SCDD_IN_POST}:220-226",
           "output.image_format": f"{_SCDD_IN}:131-137"}),
    "scdd-cifar100": _sources(
        _RECOVER_COMMON,
        **{"method": "SCDD/README.md:47-55", "dataset.normalization": f"{_SCDD_C_POST}:59,64",
           "dataset.test_resize_ratio": f"{_SCDD_C_POST}:62-65", "teacher.arch": f"{_SCDD_C}:207-217",
           "recover.iterations": "SCDD/README.md:65", "recover.lr": "SCDD/README.md:65", "recover.r_bn": "SCDD/README.md:65",
           "recover.first_bn_multiplier": f"{_SCDD_C}:261", "recover.batch_size": f"{_SCDD_C}:252-253",
           "recover.augment.crop": f"{_SCDD_C}:72-78", "recover.augment.flip": f"{_SCDD_C}:72-78",
           "recover.augment.jitter": f"{_SCDD_C}:258", "recover.augment.jitter_direction": f"{_SCDD_C}:81-83",
           "recover.augment.per": f"{_SCDD_C}:81-83",
           "validate.mode": f"{_SCDD_C_POST}:192-201", "validate.relabel_teacher": "SCDD/README.md:77",
           "validate.relabel_arch": f"{_SCDD_C_POST}:97-105", "validate.student_arch": f"{_SCDD_C_POST}:86-88",
           "validate.epochs": "SCDD/README.md:77", "validate.batch_size": f"{_SCDD_C_POST}:75-76",
           "validate.optimizer": f"{_SCDD_C_POST}:119", "validate.lr": f"{_SCDD_C_POST}:119",
           "validate.weight_decay": f"{_SCDD_C_POST}:119", "validate.decay_norm_and_bias": f"{_SCDD_C_POST}:119",
           "validate.warmup_epochs": f"{_SCDD_C_POST}:121-128", "validate.schedule_unit": f"{_SCDD_C_POST}:121-128,259",
           "validate.schedule_span": f"{_SCDD_C_POST}:121-128,34", "validate.ema_decay": f"{_SCDD_C_POST}:257",
           "validate.crop": f"{_SCDD_C_POST}:55-60", "validate.crop_padding": f"{_SCDD_C_POST}:55-60",
           "validate.mix": f"{_SCDD_C_POST}:137-147,192", "validate.mix_alpha": f"{_SCDD_C_POST}:137-147",
           "validate.temperature": f"{_SCDD_C_POST}:180", "validate.temperature_squared": f"{_SCDD_C_POST}:181,197-201",
           "output.image_format": f"{_SCDD_C}:157-163"}),
    "sre2l-imagenet": _sources(
        _RECOVER_COMMON,
        **{"method": "SRe2L/README.md", "dataset.image_size": f"{_SRE_IN}:40",
           "dataset.normalization": "SRe2L/recover/utils.py:65-66", "dataset.test_resize_ratio": f"{_SRE_FKD}:133-141",
           "teacher.arch": f"{_SRE_SH}:2", "recover.iterations": f"{_SRE_SH}:6", "recover.lr": f"{_SRE_SH}:5",
           "recover.r_bn": f"{_SRE_SH}:7", "recover.first_bn_multiplier": f"{_SRE_IN}:180",
           "recover.batch_size": f"{_SRE_SH}:4", "recover.augment.crop": f"{_SRE_IN}:55-59",
           "recover.augment.crop_scale": f"{_SRE_IN}:55-59", "recover.augment.crop_ratio": f"{_SRE_IN}:55-59",
           "recover.augment.flip": f"{_SRE_IN}:57", "recover.augment.jitter": f"{_SRE_IN}:177",
           "recover.augment.jitter_direction": f"{_SRE_IN}:62-64", "recover.augment.per": f"{_SRE_IN}:55-64",
           "validate.mode": "SRe2L/relabel/generate_soft_label.py:210-222",
           "validate.relabel_teacher": "SRe2L/relabel/relabel.sh:2", "validate.student_arch": f"{_SRE_FKD_SH}:9",
           "validate.epochs": f"{_SRE_FKD}:37", "validate.batch_size": f"{_SRE_FKD_SH}:7-8",
           "validate.optimizer": f"{_SRE_FKD}:157-159", "validate.lr": f"{_SRE_FKD}:58-61",
           "validate.weight_decay": f"{_SRE_FKD}:58-61", "validate.decay_norm_and_bias": "SRe2L/validate/utils.py:59-73",
           "validate.warmup_epochs": f"{_SRE_FKD}:161-166", "validate.schedule_unit": f"{_SRE_FKD}:161-163,190",
           "validate.schedule_span": f"{_SRE_FKD}:161-163", "validate.ema_decay": f"{_SRE_FKD}:183",
           "validate.crop": f"{_SRE_FKD}:108-117", "validate.crop_scale": f"{_SRE_FKD}:108-117",
           "validate.mix": f"{_SRE_FKD_SH}:13", "validate.mix_alpha": "SRe2L/relabel/generate_soft_label.py:66-70",
           "validate.temperature": f"{_SRE_FKD_SH}:12", "validate.temperature_squared": f"{_SRE_FKD}:248-252",
           "output.image_format": f"{_SRE_IN}:130-136"}),
    "sre2l-tiny-imagenet": _sources(
        _RECOVER_COMMON,
        **{"method": "SRe2L/*small_dataset/README_TINY.md:7-11", "dataset.normalization": "SRe2L/*small_dataset/utils.py:12-13",
           "dataset.test_resize_ratio": f"{_TINY_KD}:128-132", "teacher.arch": f"{_TINY}:97-105",
           "teacher.epochs": f"{_TINY_KD_SH}:7", "teacher.batch_size": "tiny-imagenet/script/train_rn18.sh:7-19",
           "teacher.optimizer": "tiny-imagenet/script/train_rn18.sh:7-19",
           "teacher.lr": "tiny-imagenet/script/train_rn18.sh:7-19",
           "teacher.weight_decay": "tiny-imagenet/script/train_rn18.sh:7-19",
           "recover.iterations": f"{_TINY_SH}:9", "recover.lr": f"{_TINY_SH}:7", "recover.r_bn": f"{_TINY_SH}:8",
           "recover.first_bn_multiplier": f"{_TINY}:145", "recover.batch_size": f"{_TINY_SH}:6",
           "recover.augment.crop": f"{_TINY}:49-53", "recover.augment.crop_scale": f"{_TINY}:49-53",
           "recover.augment.crop_ratio": f"{_TINY}:49-53", "recover.augment.flip": f"{_TINY}:51",
           "recover.augment.jitter": f"{_TINY}:142", "recover.augment.jitter_direction": f"{_TINY}:56-58",
           "recover.augment.per": f"{_TINY}:49-58",
           "validate.mode": f"{_TINY_KD}:32-37", "validate.relabel_teacher": f"{_TINY_KD_SH}:5-7",
           "validate.student_arch": f"{_TINY_KD}:196-217", "validate.epochs": f"{_TINY_KD_SH}:9",
           "validate.batch_size": f"{_TINY_KD_SH}:8", "validate.optimizer": f"{_TINY_KD_SH}:10-12",
           "validate.lr": f"{_TINY_KD_SH}:10-12", "validate.momentum": f"{_TINY_KD}:240-246",
           "validate.nesterov": f"{_TINY_KD}:240-246", "validate.weight_decay": f"{_TINY_KD_SH}:13",
           "validate.decay_norm_and_bias": f"{_TINY_KD}:225-236", "validate.warmup_epochs": f"{_TINY_KD_SH}:15-17",
           "validate.schedule_unit": f"{_TINY_KD}:262-264,338", "validate.schedule_span": f"{_TINY_KD}:262-264",
           "validate.ema_decay": f"{_TINY_KD}:339", "validate.crop": f"{_TINY_KD}:118-123",
           "validate.crop_scale": f"{_TINY_KD}:118-123", "validate.mix": f"{_TINY_KD}:417-418",
           "validate.temperature": f"{_TINY_KD_SH}:19", "validate.temperature_squared": f"{_TINY_KD}:35-37",
           "output.image_format": "SRe2L/*small_dataset/utils.py:85-91"}),
    "sre2l-cifar": _sources(
        _RECOVER_COMMON,
        **{"method": "SRe2L/*small_dataset/README_CIFAR.md", "dataset.normalization": f"{_CIFAR_RL}:54,61",
           "dataset.test_resize_ratio": f"{_CIFAR_RL}:58-63", "teacher.arch": f"{_CIFAR_SQ}:65-67",
           "teacher.epochs": "SRe2L/*small_dataset/squeeze_cifar.sh:1", "teacher.batch_size": f"{_CIFAR_SQ}:57",
           "teacher.optimizer": f"{_CIFAR_SQ}:85", "teacher.lr": f"{_CIFAR_SQ}:15", "teacher.weight_decay": f"{_CIFAR_SQ}:85",
           "recover.iterations": f"{_CIFAR_SH}:8", "recover.lr": f"{_CIFAR_SH}:7", "recover.r_bn": f"{_CIFAR_SH}:9",
           "recover.first_bn_multiplier": f"{_CIFAR}:215-217", "recover.batch_size": f"{_CIFAR_SH}:6",
           "recover.augment.crop": f"{_CIFAR}:78-81", "recover.augment.flip": f"{_CIFAR}:78-81",
           "recover.augment.jitter": f"{_CIFAR}:211", "recover.augment.jitter_direction": f"{_CIFAR}:79-81",
           "recover.augment.per": f"{_CIFAR}:79-81",
           "validate.mode": f"{_CIFAR_RL}:133-142", "validate.relabel_teacher": f"{_CIFAR_RL_SH}:5",
           "validate.student_arch": f"{_CIFAR_RL}:75-77", "validate.epochs": f"{_CIFAR_RL_SH}:2",
           "validate.batch_size": f"{_CIFAR_RL_SH}:6", "validate.optimizer": f"{_CIFAR_RL}:104",
           "validate.lr": f"{_CIFAR_RL}:104", "validate.weight_decay": f"{_CIFAR_RL}:104",
           "validate.decay_norm_and_bias": f"{_CIFAR_RL}:104", "validate.warmup_epochs": f"{_CIFAR_RL}:106",
           "validate.schedule_unit": f"{_CIFAR_RL}:106,197", "validate.schedule_span": f"{_CIFAR_RL}:106",
           "validate.ema_decay": f"{_CIFAR_RL}:175-188", "validate.crop": f"{_CIFAR_RL}:49-56",
           "validate.crop_padding": f"{_CIFAR_RL}:49-56", "validate.mix": f"{_CIFAR_RL}:111-121,133",
           "validate.mix_alpha": f"{_CIFAR_RL}:111-121", "validate.temperature": f"{_CIFAR_RL}:107",
           "validate.temperature_squared": f"{_CIFAR_RL}:108,139-142", "output.image_format": f"{_CIFAR}:161-167"}),
}

# What a recipe cannot set, or sets by a judgement the reference leaves open.
RECIPE_NOTES: dict[str, list[str]] = {
    "scdd-imagenet": [
        "The recovery backbone is a self-supervised ResNet-50 (MoCo v2/v3, SwAV or DINO) with a linear probe: pass "
        "it with `teacher.ssl.checkpoint` (scdd trains the probe) or a whole teacher with `teacher.checkpoint`. The "
        "relabel teacher is torchvision's supervised ResNet-18 (`pretrained=True`): pass its weights with "
        "`validate.relabel_checkpoint` (nothing is downloaded); without one scdd trains a supervised `resnet18`.",
        "`recover.lr` 0.1 is the README's command; the hyper-parameter table (`SCDD/source/parameter.png`) says 0.25.",
        "`recover.ipc` is the experiment's size and is left to the spec (the commands make 50).",
    ],
    "scdd-cifar100": [
        "`validate.lr` 0.001 is what the code runs (`post_cifar100.py:119` hard-codes AdamW 0.001 / 0.01); the README "
        "and the parameter table say 0.005.",
        "The schedule 0.5 (1 + cos(pi e / 600)) over 200 epochs (a cosine over `re_epochs` 300, halved) is "
        "`schedule_span` 3: the learning rate ends at 0.75 of its peak.",
        "`dataset.normalization` measured: the reference normalises with fixed CIFAR statistics (CIFAR-10's in recover, "
        "CIFAR-100's in post-training); measured gives any dataset its own. For the constants, set normalization "
        "given with `dataset.mean` / `dataset.std`.",
        "The reference leaves its relabel teacher in train mode (BatchNorm on batch statistics); scdd's is in eval "
        "mode. The recovery backbone is self-supervised (`teacher.ssl.checkpoint`).",
    ],
    "sre2l-imagenet": [
        "The recovery and relabel teacher is torchvision's supervised ResNet-18 (`pretrained=True`): pass its weights "
        "with `teacher.checkpoint` (a bare state dict loads into `teacher.arch`); without one scdd trains it.",
        "The reference relabels once into stored soft labels (FKD) and trains the student from them with batch 1024 "
        "(512 x 2 accumulation steps); scdd labels online by default: `validate.store_soft_labels` writes them.",
    ],
    "sre2l-tiny-imagenet": [
        "The teacher: torchvision's reference train.py, 50 epochs, batch 256, SGD 0.2, weight decay 1e-4 with 5 "
        "warm-up epochs (`script/train_rn18.sh`); scdd's supervised teacher has no warm-up and uses Nesterov momentum.",
        "The student's warm-up is LinearLR from 0.01 of the peak; scdd's rises as (e + 1) / 5.",
        "`recover.iterations` 4000 is `recover_tiny.sh`; the README's download table lists its IPC 50 set at 1K.",
    ],
    "sre2l-cifar": [
        "The teacher (`squeeze_cifar.py`): SGD without Nesterov and RandomCrop(32, 4) + flip; scdd's supervised "
        "teacher uses Nesterov momentum and random-resized crops.",
        "`dataset.normalization` measured: the reference uses CIFAR-10's statistics for CIFAR-100 throughout; set "
        "normalization given for the constants.",
        "The reference leaves its relabel teacher in train mode; scdd's is in eval mode.",
    ],
}

def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge_under(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (top's values win)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_under(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """The raw spec `data` with its recipe's values under it (the spec's own fields win). `validate` may be given
    by its alias `validate_`: the recipe's values go under whichever the spec uses."""
    name = data["recipe"]
    if not isinstance(name, str) or name not in RECIPES:
        return data  # the field's own validation names the recipes there are
    recipe = copy.deepcopy(RECIPES[name])
    if "validate_" in data and "validate" in recipe:
        recipe["validate_"] = recipe.pop("validate")
    return _merge_under(recipe, data)


def _get(spec_dict: dict[str, Any], dotted: str) -> Any:
    value: Any = spec_dict
    for part in dotted.split("."):
        value = value[part]
    return value


def recipe_facts(name: str, spec_dict: dict[str, Any]) -> dict[str, Any]:
    """What the report records of a recipe: each dotted field it sets with its value where the job kept it, and the
    job's own value where the spec overrode it (`spec_dict`: the resolved spec, `JobSpec.to_dict`)."""
    kept, overridden = {}, {}
    for dotted, value in flatten(RECIPES[name]).items():
        actual = _get(spec_dict, dotted)
        same = list(actual) == list(value) if isinstance(value, (list, tuple)) and isinstance(actual, (list, tuple)) \
            else actual == value
        (kept if same else overridden)[dotted] = value if same else actual
    return {"name": name, "set": kept, "overridden": overridden}
