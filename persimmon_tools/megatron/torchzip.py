"""Read a PyTorch zip checkpoint (``torch.save`` format since 1.6) lazily and without executing it.

Layout: ``<prefix>/data.pkl`` (the pickled object; storages appear as persistent ids
``("storage", <Type>Storage, key, location, numel)``) and ``<prefix>/data/<key>`` records stored
uncompressed. We parse the zip directory, check that no record name appears twice (``torch.load`` would
silently read the last one), that each record's local header names the same record as the directory, that
every record lies inside the file and that records do not overlap, unpickle ``data.pkl`` with
:mod:`persimmon_tools.megatron.unpickle`, and hand out :class:`~persimmon_tools.megatron.lazy.LazyTensor`
objects that point at the records' bytes. A storage is what ``torch.load`` builds: ``numel`` elements of its
type (views are bounded by that, not by the record's size), one object per key (a key named again with
another type is refused).

CRC-32 (since 2026-12-07, 0.1.0): ``data.pkl`` and ``byteorder`` are checked against the directory's CRC as
they are read, and every ``data/<key>`` record that backs a storage gets a
:class:`~persimmon_tools.megatron.records.RecordCheck`, so that the pass reading its bytes checks it
(:mod:`persimmon_tools.megatron.records`; a mismatch names the file, the record and its tensors).

This is the one byte layer of the toolkit: ``convert``, ``inspect``, ``export`` and ``verify``'s reference
side all read checkpoints through it; ``tests/megatron/test_byte_layer_oracle.py`` proves it against
``torch.load`` on every synthetic layout.

Byte order: ``<prefix>/byteorder`` holds ``little`` or ``big`` (``torch.save`` writes the writer's
``sys.byteorder``); without it, ``torch.load`` assumes little-endian. Tensors are read as raw native
(little-endian) bytes, so a ``big`` record, any other content, or a big-endian host is refused: every value
would be read with its bytes swapped.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.lazy import LazyTensor, StorageRef
from persimmon_tools.megatron.records import (
    RecordCheck,
    RecordTable,
    crc_mismatch,
    identity,
    name_tensors,
    register,
)
from persimmon_tools.megatron.unpickle import restricted_loads
from persimmon_tools.safe_graph import small_repr

log = logging.getLogger(__name__)

_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickle of torch's legacy magic number
#: Largest data.pkl we unpickle. Real ones are ~150 kB for 8B (tensors live in records, not in the pickle);
#: every pickle byte can create a Python object (EMPTY_LIST + APPEND), so this bounds memory to a few GB.
_MAX_PICKLE = 64 << 20
_BYTEORDERS = (b"little", b"big")


def _read_checked(
    src: ByteSource, fh, name: str, offset: int, size: int, crcs: dict[str, int] | None
) -> bytes:
    """Record ``name`` read whole (``offset``: absolute), checked against its CRC-32 (``crcs`` None: the file
    records none)."""
    fh.seek(offset - src.offset)
    data = fh.read(size)
    if crcs is not None and len(data) == size and zlib.crc32(data) != crcs[name]:
        what = " (the pickled checkpoint object)" if name.endswith("data.pkl") else ""
        raise crc_mismatch(src.name, name, zlib.crc32(data), crcs[name], what)
    return data


def _check_byteorder(
    src: ByteSource, fh, spans: dict[str, tuple[int, int]], prefix: str, crcs: dict[str, int] | None
) -> None:
    """Refuse a checkpoint whose tensor bytes are not little-endian (see the module docstring)."""
    name = f"{prefix}byteorder"
    if name not in spans:
        order = b"little"  # what torch.load assumes for files without the record (written before torch 1.10)
    else:
        offset, size = spans[name]
        if size > 16:
            raise CheckpointError(
                f"{src.name}: record {name} is {size} bytes; torch writes 'little' or 'big'",
                hint="the file is corrupt or was tampered with",
            )
        order = _read_checked(src, fh, name, offset, size, crcs)
        if order not in _BYTEORDERS:
            raise CheckpointError(
                f"{src.name}: record {name} holds {order!r}; expected 'little' or 'big' (torch.load refuses this "
                "file too: unknown endianness)",
                hint="the file is corrupt or was tampered with; download it again",
            )
    if order != b"little":
        raise CheckpointError(
            f"{src.name}: record {name} says the tensors are stored {order.decode()}-endian; this reader reads "
            "little-endian checkpoints only (every value would be read with its bytes swapped)",
            hint="load it with torch.load and save it again with torch.save on a little-endian machine "
            "(x86-64 or ARM), on a machine you trust with its pickle",
        )
    if sys.byteorder != "little":
        raise CheckpointError(
            f"{src.name}: this machine is {sys.byteorder}-endian; tensors are read as little-endian bytes",
            hint="run persimmon-tools on a little-endian machine (x86-64 or ARM)",
        )


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The unpickled top-level object of one ``.pt`` file; tensors in it are LazyTensors."""

    source: ByteSource
    obj: Any
    globals_seen: dict[str, str]
    records: int
    #: the CRC-32 state of the records behind its storages (None: the file records no CRC)
    table: RecordTable | None = None

    def finish_records(self) -> int:
        """Complete (read, CRC, compare) the records a pass started and did not complete; the bytes read."""
        return self.table.finish() if self.table is not None else 0


def _crcs(zf: zipfile.ZipFile, src: ByteSource) -> dict[str, int] | None:
    """``{record: CRC-32}`` from the directory; None when the writer recorded none (every non-empty record 0:
    ``torch.serialization.set_crc32_options(False)``), and then nothing is checked."""
    infos = zf.infolist()
    if any(i.file_size for i in infos) and not any(i.CRC for i in infos if i.file_size):
        log.info("%s: the zip records no CRC-32 for its records; their bytes are not checked", src.name)
        return None
    return {i.filename: i.CRC for i in infos}


_TAMPERED = "the file is damaged or was tampered with; download it again"


def _shown(name: str) -> str:
    """A storage key or record name for messages: torch writes ``0``, ``archive/data/0``; a hostile pickle's
    key may be megabytes long."""
    return name if len(name) <= 80 else small_repr(name, 80)


def _check_unique_names(zf: zipfile.ZipFile, src: ByteSource) -> None:
    """Refuse a record name listed twice in the zip directory: ``torch.load`` reads the last of them, other
    zip readers the first, so the file means two different checkpoints."""
    seen: set[str] = set()
    for info in zf.infolist():
        if info.filename in seen:
            raise CheckpointError(
                f"{src.name}: the zip holds two records named {small_repr(info.filename, 120)} (torch.load "
                "would silently read the last one)",
                hint=_TAMPERED,
            )
        seen.add(info.filename)


def _local_name(info: zipfile.ZipInfo, header: bytes, fh) -> str:
    """The record name in a local file header (decoded as :mod:`zipfile` decodes the directory's)."""
    raw = fh.read(struct.unpack("<H", header[26:28])[0])
    return raw.decode("utf-8" if info.flag_bits & 0x800 else "cp437", errors="replace")


def _record_offsets(zf: zipfile.ZipFile, src: ByteSource, fh) -> dict[str, tuple[int, int]]:
    """``{record name: (absolute data offset, size)}`` for every zip entry, validated."""
    spans = {}
    misnamed = []  # checked after the overlaps, which explain a record pointing at another one better
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{src.name}: record {info.filename} is compressed; torch never does that",
                hint="the file is not an unmodified torch.save checkpoint",
            )
        if not 0 <= info.header_offset <= src.size - 30:
            raise CheckpointError(
                f"{src.name}: zip record {info.filename} points outside the file (local header at byte "
                f"{info.header_offset}, file is {src.size} bytes)",
                hint="the file is truncated or corrupt; download it again",
            )
        fh.seek(info.header_offset)
        header = fh.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(
                f"{src.name}: zip record {info.filename} has no valid local header",
                hint="the file is truncated or corrupt; download it again",
            )
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        if _local_name(info, header, fh) != info.orig_filename:
            misnamed.append(info.filename)
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > src.size:
            raise CheckpointError(
                f"{src.name}: record {info.filename} ends at byte {start + info.file_size}, past the end of the "
                f"file ({src.size} bytes)",
                hint="the file is truncated; download it again",
            )
        spans[info.filename] = (start, info.file_size)
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for (name_a, (a, na)), (name_b, (b, _)) in zip(ordered, ordered[1:], strict=False):
        if a + na > b:
            raise CheckpointError(
                f"{src.name}: zip records {name_a} and {name_b} overlap",
                hint="the file is corrupt or was tampered with",
            )
    if misnamed:
        raise CheckpointError(
            f"{src.name}: the zip directory's record {small_repr(misnamed[0], 120)} points at a local header "
            "that names another record",
            hint=_TAMPERED,
        )
    return {name: (src.offset + a, n) for name, (a, n) in spans.items()}


def load_checkpoint(src: ByteSource) -> LoadedCheckpoint:
    """Unpickle ``src`` (a ``.pt`` file or tar member) with lazy tensors; no tensor bytes are read."""
    if src.size == 0:
        raise CheckpointError(
            f"{src.name} is empty (0 bytes)", hint="the download is incomplete; download again"
        )
    with src.open() as fh:
        magic = fh.read(16)
        if magic.startswith(_LEGACY_MAGIC[:2]) and magic[2:12] == _LEGACY_MAGIC[2:12]:
            raise CheckpointError(
                f"{src.name} uses torch's legacy (pre-1.6, non-zip) serialization, which cannot be read lazily",
                hint="re-save it with a current torch (torch.save(torch.load(f), f2)) on a trusted machine",
            )
        if not magic.startswith(b"PK"):
            raise CheckpointError(
                f"{src.name} is not a PyTorch checkpoint (no zip signature)",
                hint="pass a model_optim_rng.pt written by torch.save",
            )
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error) as err:
            # NotImplementedError: zipfile refuses a corrupt "version needed" field ("zip file version 14.7")
            raise CheckpointError(
                f"{src.name} is not a readable zip checkpoint ({err})",
                hint="the file is truncated or corrupt; download it again",
            ) from err
        with zf:
            _check_unique_names(zf, src)
            pkl_names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl_names) != 1:
                raise CheckpointError(
                    f"{src.name}: expected one <prefix>/data.pkl, found {pkl_names or 'none'}",
                    hint="the file is not a torch.save checkpoint",
                )
            prefix = pkl_names[0][: -len("data.pkl")]
            spans = _record_offsets(zf, src, fh)
            crcs = _crcs(zf, src)
            _check_byteorder(src, fh, spans, prefix, crcs)
            pkl_offset, pkl_size = spans[pkl_names[0]]
            if pkl_size > _MAX_PICKLE:
                raise CheckpointError(
                    f"{src.name}: data.pkl is {pkl_size} bytes; refusing to unpickle it",
                    hint="a model checkpoint's pickle is a few MB at most",
                )
            data = _read_checked(src, fh, pkl_names[0], pkl_offset, pkl_size, crcs)
            key_of_file = identity(os.fstat(fh.fileno()))

    made: dict[str, StorageRef] = {}
    checks: list[RecordCheck] = []

    def resolve(key: str, dtype: torch.dtype | None, numel: int) -> StorageRef:
        """The storage ``key`` as ``torch.load`` builds it: ``numel`` elements of ``dtype`` from its record;
        a key named again gets the first storage (as in torch), and must name the same dtype."""
        dtype = dtype or torch.uint8
        if key in made:
            if made[key].dtype != dtype:
                raise CheckpointError(
                    f"{src.name}: storage {_shown(key)} is referenced as {made[key].dtype} and as {dtype}",
                    hint="torch.save writes each storage with one type; the file is corrupt or was tampered with",
                )
            return made[key]
        name = f"{prefix}data/{key}"
        if name not in spans:
            raise CheckpointError(
                f"{src.name}: the pickle references storage {small_repr(key, 60)}, which has no record "
                f"{_shown(name)}",
                hint="the file is truncated or corrupt",
            )
        offset, size = spans[name]
        if numel * dtype.itemsize > size:
            raise CheckpointError(
                f"{src.name}: storage {_shown(key)} claims {numel} x {dtype} but its record holds "
                f"{size} bytes",
                hint="the file is corrupt or was tampered with",
            )
        # Views are bounded by the storage torch would build (numel elements), not by the record's size.
        nbytes = numel * dtype.itemsize
        check = None
        if crcs is not None and size:
            check = RecordCheck(src.name, name, offset, size, crcs[name], nbytes)
            checks.append(check)
        made[key] = StorageRef(src.path, offset, nbytes, dtype, key, f"{src.name}:{name}", record=check)
        return made[key]

    obj, seen = restricted_loads(data, src.name, resolve)
    table = None
    if crcs is not None:
        table = RecordTable(src.path, src.name, key_of_file, src.offset, src.size, checks)
        name_tensors(obj, lambda x: x.storage.record if isinstance(x, LazyTensor) else None)
        register(table)
    return LoadedCheckpoint(source=src, obj=obj, globals_seen=seen, records=len(spans), table=table)
