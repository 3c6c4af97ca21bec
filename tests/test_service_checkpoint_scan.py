"""Admission judges a checkpoint's pickle without torch (service/checkpoint_scan.py): each verdict is checked
against the library's own safe load (scdd/models/checkpoint.py), and one spec goes through the API."""

from __future__ import annotations

import argparse
import pathlib
import pickle
import zipfile

import pytest
import torch
from torch import nn

from scdd.errors import CheckpointError
from scdd.models.checkpoint import read_checkpoint
from service.api.main import create_app
from service.checkpoint_scan import ALLOWED_GLOBALS, SAFE_OPCODES, checkpoint_refusal
from tests.services import ApiServer, api_settings

# A pickle (protocol 2, as torch.save writes) of {"cmd": os.system("true")}, as a hostile file would hold it.
OS_SYSTEM = b"\x80\x02}q\x00X\x03\x00\x00\x00cmdq\x01cos\nsystem\nq\x02X\x04\x00\x00\x00trueq\x03\x85q\x04Rq\x05s."
SAVE_WEIGHTS = "save the weights alone: torch.save({'state_dict': model.state_dict()}, path)"


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def _saved(obj, path: pathlib.Path, **kwargs) -> pathlib.Path:
    torch.save(obj, path, **kwargs)
    return path


def _with_pickle(good: pathlib.Path, data_pkl: bytes, path: pathlib.Path) -> pathlib.Path:
    """`good`, a torch.save archive, with its data.pkl replaced."""
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            target.writestr(entry, data_pkl if entry.filename.endswith("/data.pkl") else source.read(entry))
    return path


def _library_refuses(path: pathlib.Path) -> bool:
    try:
        read_checkpoint(path.read_bytes(), str(path))
    except CheckpointError:
        return True
    return False


def test_the_allow_lists_mirror_torchs_weights_only_unpickler():
    unpickler = pytest.importorskip("torch._weights_only_unpickler")
    if not hasattr(unpickler, "_get_allowed_globals"):
        pytest.skip("this torch keeps its allow-list elsewhere")
    assert ALLOWED_GLOBALS == set(unpickler._get_allowed_globals()) | {"argparse.Namespace"}
    opcodes = {name for name, value in vars(unpickler).items() if isinstance(value, bytes) and hasattr(pickle, name)}
    assert SAFE_OPCODES == opcodes


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's, loading the protocol-4 file
def test_the_scanner_refuses_what_the_safe_load_refuses_in_one_line(tmp_path):
    model = _model()
    good = _saved({"state_dict": model.state_dict(), "arch": "convnet", "num_classes": 2}, tmp_path / "good.pt")
    torchvision = _saved({"model": model.state_dict(), "args": argparse.Namespace(model="resnet18", lr=0.1),
                          "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(), "epoch": 3},
                         tmp_path / "torchvision.pth")
    legacy = _saved({"state_dict": model.state_dict()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with_path = _saved({"model": model.state_dict(), "args": argparse.Namespace(output_dir=pathlib.Path("/out"))},
                       tmp_path / "with_path.pt")
    legacy_path = _saved({"state_dict": model.state_dict(), "root": pathlib.Path("/data")}, tmp_path / "legacy_path.pt",
                         _use_new_zipfile_serialization=False)
    whole_model = _saved(model, tmp_path / "model.pt")
    protocol_4 = _saved({"state_dict": model.state_dict()}, tmp_path / "protocol4.pt", pickle_protocol=4)
    os_system = _with_pickle(good, OS_SYSTEM, tmp_path / "os_system.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk bytes, not a checkpoint")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=2))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])

    for passes in (good, torchvision, legacy):
        assert checkpoint_refusal(str(passes)) is None, passes
        assert not _library_refuses(passes)
    expected = {
        with_path: "pickles pathlib.PosixPath, which a safe load refuses; " + SAVE_WEIGHTS,
        legacy_path: "pickles pathlib.PosixPath, which a safe load refuses; " + SAVE_WEIGHTS,
        whole_model: "pickles torch.nn.modules.container.Sequential, which a safe load refuses; " + SAVE_WEIGHTS,
        os_system: "pickles os.system, which a safe load refuses; " + SAVE_WEIGHTS,
        protocol_4: "is pickled with the opcode FRAME (pickle protocol 4), which a safe load does not read; save it "
                    "with torch.save's default pickle_protocol (2)",
        junk: "is a file starting with b'junk bytes, ', not a file written by torch.save; expected one",
        plain: "is a pickle without torch.save's magic number (pickle.dump?), not a file written by torch.save",
        truncated: "is a damaged zip archive (",
    }
    for path, why in expected.items():
        refusal = checkpoint_refusal(str(path))
        assert refusal is not None and refusal.startswith(f"checkpoint {path} {why}"), (path, refusal)
        assert "\n" not in refusal
        assert _library_refuses(path), path  # never stricter than the library
    # not judged here: the squeeze stage reports a missing file or a folder
    assert checkpoint_refusal(str(tmp_path / "missing.pt")) is None
    assert checkpoint_refusal(str(tmp_path)) is None


def test_a_spec_naming_an_unsafe_checkpoint_is_422_and_a_safe_one_is_accepted(redis_server, tmp_path):
    model = _model()
    bad = _saved({"model": model.state_dict(), "args": argparse.Namespace(output_dir=pathlib.Path("/out"))},
                 tmp_path / "bad.pt")
    good = _saved({"state_dict": model.state_dict()}, tmp_path / "good.pt")
    spec = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path))).start()
    try:
        with server.client("key-acme") as acme:
            refused = acme.post("/v1/jobs", json={**spec, "teacher": {"checkpoint": str(bad)}})
            assert refused.status_code == 422, refused.text
            assert refused.json()["message"] == (f"teacher.checkpoint: checkpoint {bad} pickles pathlib.PosixPath, "
                                                 f"which a safe load refuses; {SAVE_WEIGHTS}")
            accepted = acme.post("/v1/jobs", json={**spec, "teacher": {"checkpoint": str(good)}})
            assert accepted.status_code == 202, accepted.text
    finally:
        server.stop()
