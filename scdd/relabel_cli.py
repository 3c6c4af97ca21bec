"""`scdd relabel`: write the soft labels of N epochs for a distilled set that exists, without training a student.

The set is a scdd output (its manifest.json and images/; the protocol and dataset come from the spec it
records) or, with --config naming the dataset, a plain ImageFolder (scdd/validate/external_set.py). The batches
are drawn exactly as the validation student with the same protocol and seed would draw them (order, crops,
flips, mix: `scdd.validate.train.online_batches`), the teacher of --teacher-checkpoint labels them, and they are
written in the soft-label format (scdd/validate/soft_labels.py; docs/output-and-s3.md) under soft_labels/ of
--out (default: the set's own folder). A student trains from them with `train_student(...,
soft_label_source=SoftLabelReader(store))`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# flag -> (validate field, type, help): the protocol options that shape the stored batches
PROTOCOL_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--batch-size": ("batch_size", int, "student batch size (default: the recorded spec's protocol)"),
    "--student-crop": ("crop", str, "resized or padded"),
    "--crop-padding": ("crop_padding", int, "crop padded: pixels of zero padding"),
    "--mix": ("mix", str, "none, cutmix or mixup"),
    "--mix-alpha": ("mix_alpha", float, "Beta(alpha, alpha) of the mixing ratio"),
}


def add_relabel(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "relabel", help="write soft labels (FKD style) for an existing distilled set",
        description="Label N epochs of the validation student's augmented batches of an existing set with a teacher "
        "and write them under soft_labels/ (the format: docs/output-and-s3.md), without training a student.")
    parser.add_argument("images", help="a scdd output folder or URL (manifest.json + images/), or an ImageFolder "
                        "(then --config gives the dataset)")
    parser.add_argument("--teacher-checkpoint", required=True, help="the teacher's checkpoint (scdd's, or a foreign "
                        "one: --relabel-arch names its architecture)")
    parser.add_argument("--relabel-arch", default=None, help="architecture of a checkpoint that does not name it")
    parser.add_argument("--epochs", type=int, required=True, help="epochs of soft labels to write")
    parser.add_argument("--topk", type=int, default=None, help="keep only the top-k logits of each image")
    parser.add_argument("--config", default=None, help="YAML job spec (default: the spec the scdd output records)")
    parser.add_argument("--out", default=None, help="folder or URL to write soft_labels/ under (default: the set's)")
    parser.add_argument("--seed", type=int, default=None, help="the seed of the draws (default: the spec's)")
    for flag, (name, kind, text) in PROTOCOL_FLAGS.items():
        parser.add_argument(flag, dest=f"validate.{name}", type=kind, default=None, help=text)
    parser.set_defaults(handler=relabel_command)


def relabel_command(args: argparse.Namespace) -> int:
    from scdd.errors import ScddError

    try:
        facts = _relabel(args)
    except (ScddError, ValueError) as exc:
        print(f"scdd: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {facts['epochs']} epochs of soft labels: {facts['batches']} batches, {facts['images']} images, "
          f"{facts['bytes']} bytes under {facts['path']}/")
    return 0


def _spec(args: argparse.Namespace, source: Any) -> Any:
    import yaml

    from api_schema import JobSpec
    from scdd.layout import MANIFEST

    if args.config:
        with open(args.config) as handle:
            data = yaml.safe_load(handle) or {}
    elif source.exists(MANIFEST):
        data = source.read_json(MANIFEST)["spec"]
    else:
        raise ValueError(f"{args.images} is not a scdd output (no {MANIFEST}): pass --config naming its dataset")
    validate = dict(data.get("validate", data.get("validate_", {})))
    validate.pop("enabled", None)
    for flag, (name, _kind, _text) in PROTOCOL_FLAGS.items():
        value = getattr(args, f"validate.{name}")
        if value is not None:
            validate[name] = value
    validate.update(mode="kd", store_soft_labels=args.epochs, soft_label_topk=args.topk)
    data = {key: value for key, value in data.items() if key not in ("validate", "validate_")}
    return JobSpec.model_validate({**data, "validate": validate})


def _relabel(args: argparse.Namespace) -> dict:
    from scdd.artifacts import read_distilled
    from scdd.data import load_dataset
    from scdd.layout import MANIFEST
    from scdd.runtime import resolve_runtime
    from scdd.squeeze.teachers import RELABEL_ARCH_FIELD, _from_checkpoint
    from scdd.store import ArtifactStore
    from scdd.validate.protocol import resolve_protocol

    source = ArtifactStore(args.images)
    spec = _spec(args, source)
    data = load_dataset(spec.dataset, spec.seed)
    if source.exists(MANIFEST):
        images = read_distilled(source, source.read_json(MANIFEST)["images"], data.info)
    else:
        from scdd.validate.external_set import read_image_folder

        images = read_image_folder(args.images, data.info, spec)
    runtime = resolve_runtime(spec.resources)
    teacher = _from_checkpoint(spec, data, args.teacher_checkpoint, args.relabel_arch, RELABEL_ARCH_FIELD).model
    teacher.to(runtime.device).eval().requires_grad_(False)
    protocol = resolve_protocol(spec.validate_, len(images), data.info.image_size)
    seed = spec.seed if args.seed is None else args.seed
    out = ArtifactStore(args.out) if args.out else source
    return relabel(images, protocol, teacher, out, args.epochs, args.topk, seed, runtime,
                   extra={"teacher_checkpoint": args.teacher_checkpoint, "seed": seed})


def relabel(images: Any, protocol: Any, teacher: Any, store: Any, epochs: int, topk: int | None, seed: int,
            runtime: Any, extra: dict | None = None) -> dict:
    """Write `epochs` epochs of soft labels of `images` (a PixelSet in manifest order) under `store`: the batches
    a one-process student under `protocol` with `seed` draws, labelled by `teacher`. Returns SoftLabelFacts."""
    import torch

    from scdd.shard import LOCAL
    from scdd.validate.soft_labels import SoftLabelWriter, write_index
    from scdd.validate.train import online_batches, padding_fill

    writer = SoftLabelWriter(store, epochs, topk)
    writer.begin(0, images.pixels.shape[-1], protocol.crop)
    generator = torch.Generator().manual_seed(seed)  # as train_student's
    fill = padding_fill(images, protocol)
    images = images.to(runtime.device)
    for epoch in range(epochs):  # a student of E epochs replays stored epoch e mod N
        order = LOCAL.shard_order(len(images), images.set_size, epoch, generator, seed).to(runtime.device)
        for index, crops, mix, batch in online_batches(images, protocol, order, protocol.batch_size, generator, fill,
                                                       runtime.memory_format()):
            with torch.no_grad(), runtime.autocast():
                logits = teacher(batch)
            writer.add(index.cpu(), crops, mix, logits)
        writer.end_epoch(epoch)
    return write_index(store, topk, 1, protocol.to_dict(), extra)
