"""Judge a checkpoint file the way the library's safe load will, without torch.

The library reads every checkpoint a spec names (`teacher.checkpoint`, `teacher.ssl.checkpoint`,
`validate.relabel_checkpoint(s)`) with `torch.load(weights_only=True)` plus one allow-listed class,
`argparse.Namespace` (scdd/models/checkpoint.py). The API process does not import torch (nor the other compute
packages: docs/service.md, tests/test_service_api.py), so admission cannot call that loader; instead it reads the
file's pickle with `pickletools.genops` — never unpickling it — and refuses, in one line, what that load would
refuse: a file torch.save did not write, a TorchScript archive, and a pickle that names a global outside the
allow-list or uses an opcode the weights-only unpickler does not read. Anything it cannot judge (a missing or
unreadable file, a pickle over MAX_PICKLE_BYTES) passes; the squeeze stage still judges it, and judges what a
pickle cannot show (a top level that is not a dict, weights that do not fit the model).

Only the pickle is read: of torch.save's zip archive the central directory and `<name>/data.pkl` (the tensors are
separate entries), of the legacy format (`_use_new_zipfile_serialization=False`) the pickles before its storages.
The lists below mirror torch/_weights_only_unpickler.py (`_get_allowed_globals`, the opcodes its Unpickler
handles); tests/test_service_checkpoint_scan.py checks them against the installed torch.
"""

from __future__ import annotations

import io
import os
import pickletools
import stat
import zipfile
import zlib
from typing import BinaryIO, Iterator, Optional

MAX_PICKLE_BYTES = 64 << 20  # a state dict's pickle is KBs to a few MB; a bigger one is not judged here

# -- what torch.load(weights_only=True) accepts, plus argparse.Namespace ---------------------------------------
_DENSE = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
_STORAGES = (*_DENSE, "ComplexDouble", "ComplexFloat")
_QUANTIZED_STORAGES = ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")
_DTYPES = ("bool", "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128", "bcomplex32",
           "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
           *(f"uint{bits}" for bits in range(1, 8)), *(f"int{bits}" for bits in range(1, 8)),
           "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
           "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2")
_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
             "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
             "_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass", "_rebuild_device_tensor_from_numpy",
             "_rebuild_device_tensor_from_cpu_tensor")
_QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
             "per_channel_affine_float_qparams")
ALLOWED_GLOBALS = frozenset({
    "argparse.Namespace",  # the library's one addition: torchvision's reference script stores its arguments in one
    "collections.OrderedDict", "collections.Counter",  # containers; plain dict/list/tuple need no global
    "builtins.set", "builtins.bytearray", "builtins.complex", "_codecs.encode",  # _codecs.encode: bytes, protocol 2
    "torch.Size", "torch.Tensor", "torch.device", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage", "torch._tensor._rebuild_from_type_v2",
    *(f"torch._utils.{name}" for name in _REBUILDS),
    *(f"torch.{name}" for name in (*_DTYPES, *_QSCHEMES)),
    *(f"torch.{kind}Storage" for kind in (*_STORAGES, *_QUANTIZED_STORAGES)),  # legacy storage and tensor classes
    *(f"torch.cuda.{kind}Storage" for kind in _STORAGES),
    *(f"torch.{where}{kind}Tensor" for where in ("", "cuda.") for kind in _DENSE),
    *(f"torch.{where}sparse.{kind}Tensor" for where in ("", "cuda.") for kind in _DENSE if kind != "Bool"),
})
# torch maps a protocol-2 pickle's Python 2 module names before the check (torch._utils.IMPORT_MAPPING).
_IMPORT_MAPPING = {"__builtin__": "builtins", "copy_reg": "copyreg", "Queue": "queue", "repr": "reprlib",
                   "_abcoll": "collections.abc", "UserDict": "collections", "UserList": "collections",
                   "UserString": "collections", "whichdb": "dbm", "StringIO": "io", "cStringIO": "io"}
# The opcodes the weights-only unpickler reads (protocol 2, torch.save's default); any other is refused by it.
SAFE_OPCODES = frozenset({
    "PROTO", "STOP", "MARK", "GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "BINPERSID", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b"."  # its first pickle
_LEGACY_PICKLES = 4  # magic number, protocol version, sys info, the object; then storage keys and the storages
_FORMATS = ((b"\x93NUMPY", "a NumPy .npy file"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
            (b"\x1f\x8b", "a gzip file"))
_SAVE_WEIGHTS = "save the weights alone: torch.save({'state_dict': model.state_dict()}, path)"


class _Unjudged(Exception):
    """The file cannot be judged here (too big to read): let the squeeze stage judge it."""


class _Bounded:
    """A file read (by pickletools.genops) from its current position, at most `limit` bytes: a length beyond them
    raises _Unjudged before anything is read."""

    def __init__(self, file: BinaryIO, limit: int):
        self.file, self.left = file, limit

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise _Unjudged
        data = self.file.read(size)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.file.readline(self.left + 1)
        if len(line) > self.left:
            raise _Unjudged
        self.left -= len(line)
        return line


def _globals_and_opcodes(stream) -> Iterator[tuple[str, Optional[str], int]]:
    """(opcode name, the global it names or None, pickle protocol) for each opcode of one pickle."""
    protocol, pushed, memo = 0, [], {}
    for opcode, arg, _ in pickletools.genops(stream):
        name, named = opcode.name, None
        if name == "PROTO":
            protocol = arg
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            named = f"{_IMPORT_MAPPING.get(module, module)}.{attr}"
        elif name == "STACK_GLOBAL":  # protocol 4+: module and name are the two strings pushed before it
            module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            named = f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "a global"
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name not in ("PROTO", "FRAME"):
            pushed.append(arg if isinstance(arg, str) and ("UNICODE" in name or "STRING" in name) else None)
        del pushed[:-2]
        yield name, named, protocol


def _pickle_refusal(stream, source: str) -> Optional[str]:
    """Why the weights-only unpickler refuses this pickle (read from `stream` up to its STOP), or None."""
    unread = None
    try:
        for name, named, protocol in _globals_and_opcodes(stream):
            if named is not None and named not in ALLOWED_GLOBALS:
                return f"checkpoint {source} pickles {named}, which a safe load refuses; {_SAVE_WEIGHTS}"
            if name not in SAFE_OPCODES and unread is None:
                unread = (f"checkpoint {source} is pickled with the opcode {name} (pickle protocol {protocol}), "
                          f"which a safe load does not read; save it with torch.save's default pickle_protocol (2)")
    except (ValueError, EOFError, UnicodeDecodeError) as exc:  # genops on a damaged or truncated pickle
        why = " ".join(str(exc).split())[:120]
        return f"checkpoint {source} holds a damaged pickle ({why}); expected a file written by torch.save"
    return unread


def _found(head: bytes) -> str:
    """What a file that is not torch.save's looks like, from its first bytes."""
    if not head:
        return "an empty file"
    for magic, what in _FORMATS:
        if head.startswith(magic):
            return what
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    if head[257:262] == b"ustar":
        return "a tar archive (torch's pre-1.0 format, which a safe load refuses)"
    return f"a file starting with {head[:12]!r}"


def _zip_refusal(file: BinaryIO, source: str) -> Optional[str]:
    """torch.save's zip format (torch >= 1.6): every entry under one folder, the pickle in `<folder>/data.pkl`."""
    damaged = f"checkpoint {source} is a damaged zip archive ({{}}); expected a file written by torch.save"
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
            folder = entries[0].filename.split("/", 1)[0] if entries and "/" in entries[0].filename else None
            names = {entry.filename for entry in entries}
            if folder is None or f"{folder}/data.pkl" not in names:
                return (f"checkpoint {source} is a zip archive without <name>/data.pkl, not a file written by "
                        f"torch.save; expected one")
            if f"{folder}/constants.pkl" in names:
                return (f"checkpoint {source} is a TorchScript archive (torch.jit.save), which a safe load refuses; "
                        f"{_SAVE_WEIGHTS}")
            with archive.open(f"{folder}/data.pkl") as pickled:
                data = pickled.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error) as exc:
        return damaged.format(" ".join(str(exc).split())[:120])
    if len(data) > MAX_PICKLE_BYTES:
        raise _Unjudged
    return _pickle_refusal(io.BytesIO(data), source)


def _legacy_refusal(file: BinaryIO, source: str, head: bytes) -> Optional[str]:
    """torch.save's legacy format: pickles one after another (magic number, protocol version, sys info, the
    object), then the storages; a pickle without the magic number is not torch.save's."""
    stream = _Bounded(file, MAX_PICKLE_BYTES)
    legacy = head.startswith(_LEGACY_MAGIC)
    for _ in range(_LEGACY_PICKLES if legacy else 1):
        refusal = _pickle_refusal(stream, source)
        if refusal:
            return refusal
    if not legacy:  # a pickle of safe things (pickle.dump?), but not torch.save's
        return (f"checkpoint {source} is a pickle without torch.save's magic number (pickle.dump?), not a file "
                f"written by torch.save; expected one")
    return None


def checkpoint_refusal(path: str) -> Optional[str]:
    """One line saying why the library's safe load will refuse the local file at `path` (what was found, what is
    expected), or None: it passes, or cannot be judged here (missing, unreadable, a pickle over MAX_PICKLE_BYTES).
    Blocking (file reads): call it off the event loop."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a folder, a FIFO (opening one would block): not judged
            return None
        with open(path, "rb") as file:
            head = file.read(512)
            file.seek(0)
            if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (torch >= 1.6)
                return _zip_refusal(file, path)
            if head.startswith(b"\x80"):  # a pickle: torch.save's legacy format, or not torch.save's at all
                return _legacy_refusal(file, path, head)
            return f"checkpoint {path} is {_found(head)}, not a file written by torch.save; expected one"
    except _Unjudged:
        return None
    except (OSError, ValueError):  # missing, unreadable, a name the OS refuses: the squeeze stage reports it
        return None
