"""Builders of hostile and broken inputs for the reliability tests (hand-made pickles, zips and tars).

Pickles are written opcode by opcode where ``pickle.dumps`` cannot produce the attack (a ``BUILD`` on a
storage reference, a memo index of 2**31, a dict that contains itself), and wrapped into the zip layout of
``torch.save`` (``archive/data.pkl`` + ``archive/data/<key>`` records, stored uncompressed).
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from persimmon_tools.megatron.ptwriter import write_pt

P = pickle  # opcode constants: P.MARK, P.BUILD, ...


def s(text: str) -> bytes:
    """SHORT_BINUNICODE ``text``."""
    raw = text.encode()
    assert len(raw) < 256
    return P.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def pickled_args(args: tuple) -> bytes:
    """Opcodes that push ``args`` (a tuple of plain values) on the stack (protocol 2, no memo clash)."""
    return pickle.dumps(args, protocol=2)[2:-1]


def program(*ops: bytes) -> bytes:
    return P.PROTO + b"\x02" + b"".join(ops) + P.STOP


def call(module: str, name: str, *args: object) -> bytes:
    """Opcodes for ``module.name(*args)`` (a REDUCE)."""
    return glob(module, name) + pickled_args(args) + P.REDUCE


def checkpoint_with_args(args_ops: bytes) -> bytes:
    """``{"model": {}, "args": <args_ops>}``."""
    return program(P.EMPTY_DICT, s("model"), P.EMPTY_DICT, P.SETITEM, s("args"), args_ops, P.SETITEM)


def storage(key: str = "0", numel: int = 4, storage_type: str = "FloatStorage") -> bytes:
    """A persistent id ``("storage", torch.<type>, key, "cpu", numel)``."""
    return (
        P.MARK
        + s("storage")
        + glob("torch", storage_type)
        + s(key)
        + s("cpu")
        + P.BININT
        + struct.pack("<i", numel)
        + P.TUPLE
        + P.BINPERSID
    )


def tensor(
    storage_ops: bytes, offset: int = 0, size: int = 4, after_storage: bytes = b"", stride: int = 1
) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, (size,), (stride,), False, OrderedDict())``."""
    return (
        glob("torch._utils", "_rebuild_tensor_v2")
        + P.MARK
        + storage_ops
        + after_storage
        + P.BININT
        + struct.pack("<i", offset)
        + P.BININT
        + struct.pack("<i", size)
        + P.TUPLE1
        + P.BININT1
        + bytes([stride])
        + P.TUPLE1
        + P.NEWFALSE
        + glob("collections", "OrderedDict")
        + P.EMPTY_TUPLE
        + P.REDUCE
        + P.TUPLE
        + P.REDUCE
    )


def model_with(tensor_ops: bytes, name: str = "w") -> bytes:
    """``{"model": {name: <tensor_ops>}}``."""
    return program(P.EMPTY_DICT, s("model"), P.EMPTY_DICT, s(name), tensor_ops, P.SETITEM, P.SETITEM)


def write_torch_zip(
    path: Path, pkl: bytes, records: dict[str, bytes] | None = None, *, compress: bool = False
) -> Path:
    """A ``torch.save``-layout zip: ``archive/data.pkl`` and ``archive/data/<key>`` records."""
    records = {"0": bytes(16)} if records is None else records
    kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", kind) as zf:
        zf.writestr("archive/data.pkl", pkl)
        for key, data in records.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return path


def patch_central_directory(path: Path, name: str, **fields: int) -> None:
    """Overwrite fields (``compress_size``, ``file_size``, ``header_offset``) of ``name``'s central-directory
    entry in a zip (the local header is left alone, as a tampered file would)."""
    offsets = {"compress_size": 20, "file_size": 24, "header_offset": 42}
    data = bytearray(path.read_bytes())
    start = 0
    while True:
        at = data.find(b"PK\x01\x02", start)
        assert at >= 0, f"no central-directory entry for {name}"
        name_len = struct.unpack("<H", data[at + 28 : at + 30])[0]
        if data[at + 46 : at + 46 + name_len].decode() == name:
            break
        start = at + 4
    for field, value in fields.items():
        data[at + offsets[field] : at + offsets[field] + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


class Reduce:
    """Pickles (via ``pickle``/``write_pt``) as ``func(*args)``: the classic ``__reduce__`` payload."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def write_pt_obj(path: Path, obj: object) -> Path:
    with open(path, "wb") as fh:
        write_pt(fh, obj)
    return path


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def fixture_members(tar: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members of a release tarball with their bytes (folders: None)."""
    out = []
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            out.append((m, tf.extractfile(m).read() if m.isreg() else None))
    return out


def gpt2_megatron_checkpoint(
    layers: int = 2, hidden: int = 32, vocab: int = 128, positions: int = 64
) -> dict:
    """A GPT-2-style Megatron-LM checkpoint: learned position embeddings, GeLU MLP, no QK-layernorm, tied
    output embedding (no ``word_embeddings_for_head``)."""
    import argparse

    def z(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float16)

    encoder: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"layers.{i}."
        encoder |= {
            p + "input_layernorm.weight": z(hidden),
            p + "input_layernorm.bias": z(hidden),
            p + "self_attention.query_key_value.weight": z(3 * hidden, hidden),
            p + "self_attention.query_key_value.bias": z(3 * hidden),
            p + "self_attention.dense.weight": z(hidden, hidden),
            p + "self_attention.dense.bias": z(hidden),
            p + "post_attention_layernorm.weight": z(hidden),
            p + "post_attention_layernorm.bias": z(hidden),
            p + "mlp.dense_h_to_4h.weight": z(4 * hidden, hidden),
            p + "mlp.dense_h_to_4h.bias": z(4 * hidden),
            p + "mlp.dense_4h_to_h.weight": z(hidden, 4 * hidden),
            p + "mlp.dense_4h_to_h.bias": z(hidden),
        }
    encoder |= {"final_layernorm.weight": z(hidden), "final_layernorm.bias": z(hidden)}
    return {
        "args": argparse.Namespace(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=4,
            max_position_embeddings=positions,
            position_embedding_type="learned_absolute",
            fp16=True,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
        ),
        "checkpoint_version": 3.0,
        "iteration": 1000,
        "model": {
            "language_model": {
                "embedding": {
                    "word_embeddings": {"weight": z(vocab, hidden)},
                    "position_embeddings": {"weight": z(positions, hidden)},
                },
                "encoder": encoder,
            }
        },
    }


def basic_hostile_tar(path: Path, kind: str, sentinel_dir: Path) -> None:
    """A tar with one good member and one hostile member of ``kind`` (dotdot, absolute, symlink, hardlink,
    device) aimed at ``sentinel_dir``."""
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("rel/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(
            {"dotdot": "rel/../../escape.txt", "absolute": f"{sentinel_dir}/abs.txt"}.get(kind, "rel/x")
        )
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, str(sentinel_dir)
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        else:
            info.size = 4
        tf.addfile(info, io.BytesIO(b"evil") if info.isreg() else None)
