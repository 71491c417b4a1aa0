"""Write a release in ADEPT's layout (spec §A-§B) from per-rank checkpoint objects; shared by ``make-release``
and ``export``, so the layout is known in one place.

Layout (inside a tarball, or under a folder)::

    NAME/adept_vocab.model  NAME/adept_vocab.vocab  NAME/latest_checkpointed_iteration.txt
    NAME/iter_{K:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
    NAME/integrity.json   (``ReleaseFiles.integrity``: export's manifest, last; see
                           :mod:`persimmon_tools.megatron.manifest`)

Each shard's bytes pass once through a :class:`~persimmon_tools.megatron.manifest.HashingSink` on their way
to the file (the zip is written forward only), so the manifest's sha256s cost no second read.

``ckpt["model"]`` of each shard (spec §B.2) nests ``{"language_model": {"embedding": {"word_embeddings":
{"weight": [V/tp, H]}}, "encoder": OrderedDict(flat "layers.{j}...." keys)}, "word_embeddings_for_head":
{"weight": [V/tp, H]}}``: the first pipeline stage holds the embedding, the last the final layernorm and the
untied head, and every stage numbers its own layers from 0 (``j = i - first layer of the stage``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from persimmon_tools.errors import UsageError
from persimmon_tools.megatron.manifest import MANIFEST, HashingSink, manifest_bytes
from persimmon_tools.megatron.ptwriter import TarWriter, TensorSpec, payload_bytes, write_pt
from persimmon_tools.ops import layer_index
from persimmon_tools.safe_write import open_new_file, write_new_file
from persimmon_tools.staged_record import tar_record_header

ENCODER = "language_model.encoder."
EMBEDDING = "language_model.embedding.word_embeddings.weight"
HEAD = "word_embeddings_for_head.weight"

Dump = Callable[[BinaryIO, Any, Callable[[int], None]], None]


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """The global layer numbers of each pipeline stage (Megatron splits layers evenly)."""
    if pp < 1 or num_layers % pp:
        raise UsageError(
            f"PP={pp} does not divide the model's {num_layers} layers",
            hint="Megatron gives every pipeline stage the same number of layers; choose a PP that divides "
            f"{num_layers}",
        )
    per = num_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """``mp_rank_XX`` without pipeline parallelism, ``mp_rank_XX_YYY`` with it (``get_checkpoint_names``)."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def stage_model(tensors: Mapping[str, TensorSpec], layers: range, first: bool, last: bool) -> dict:
    """``ckpt["model"]`` of one shard from flat, globally numbered Megatron keys (tensors of this rank).

    Keys of layers outside ``layers`` are left out; the embedding goes to the first stage, the final
    layernorm and the head to the last.
    """
    encoder: OrderedDict[str, TensorSpec] = OrderedDict()
    model: dict[str, Any] = {"language_model": {}}
    for key, spec in tensors.items():
        i = layer_index(key)
        if key.startswith(ENCODER + "layers.") and i is not None:
            if i in layers:
                local = key.replace(f".layers.{i}.", f".layers.{i - layers.start}.", 1)
                encoder[local.removeprefix(ENCODER)] = spec
        elif key.startswith(ENCODER):
            if last:
                encoder[key.removeprefix(ENCODER)] = spec
        elif key == EMBEDDING:
            if first:
                model["language_model"]["embedding"] = {"word_embeddings": {"weight": spec}}
        elif key == HEAD:
            if last:
                model["word_embeddings_for_head"] = {"weight": spec}
        else:
            raise ValueError(f"no place in ADEPT's layout for {key}")
    model["language_model"]["encoder"] = encoder
    return model


@dataclass(frozen=True)
class ReleaseFiles:
    """Everything a release holds, before it is written: the small files and one object per shard."""

    name: str
    iteration: int
    tp: int
    pp: int
    objects: Mapping[tuple[int, int], Any]  # (tp_rank, pp_rank) -> ckpt dict with TensorSpec leaves
    small_files: Mapping[str, bytes]  # file name (in NAME/) -> content, e.g. adept_vocab.model
    #: write ``NAME/integrity.json`` (sha256 and size of every other file, hashed while written)
    integrity: bool = False

    def shard_member(self, tp_rank: int, pp_rank: int) -> str:
        return (
            f"{self.name}/iter_{self.iteration:07d}/{rank_dir(tp_rank, pp_rank, self.pp)}/model_optim_rng.pt"
        )

    def ordered_shards(self) -> list[tuple[str, Any]]:
        """``(member path, object)`` in pipeline-stage-major order (the order Megatron's ranks save in)."""
        order = sorted(self.objects, key=lambda r: (r[1], r[0]))
        return [(self.shard_member(t, s), self.objects[(t, s)]) for t, s in order]

    def small_members(self) -> list[tuple[str, bytes]]:
        files = dict(self.small_files)
        files["latest_checkpointed_iteration.txt"] = str(self.iteration).encode()
        return [(f"{self.name}/{fname}", data) for fname, data in files.items()]

    def payload_bytes(self) -> int:
        """The tensor bytes the shards hold: what the writers below report to ``progress``, in all."""
        return sum(payload_bytes(obj) for obj in self.objects.values())

    def tar_members(self) -> list[str]:
        """Every member of the tarball, in the order :func:`write_release_tar` writes them."""
        manifest = [f"{self.name}/{MANIFEST}"] if self.integrity else []
        return [
            self.name,
            *(m for m, _ in self.small_members()),
            *(m for m, _ in self.ordered_shards()),
            *manifest,
        ]

    def manifest(self, digests: Mapping[str, tuple[str, int]]) -> tuple[str, bytes]:
        """``(member, content)`` of the manifest of ``{member: (sha256, size)}`` (paths made relative)."""
        cut = len(self.name) + 1
        return f"{self.name}/{MANIFEST}", manifest_bytes({m[cut:]: d for m, d in digests.items()})


def _small_digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def default_dump(fh: BinaryIO, obj: Any, on_bytes: Callable[[int], None]) -> None:
    write_pt(fh, obj, on_bytes=on_bytes)


def write_release_folder(
    files: ReleaseFiles,
    root: Path,
    *,
    dump: Dump = default_dump,
    progress: Callable[[int], None] = lambda n: None,
    workers: int = 1,
    top: bool = True,
) -> Path:
    """Write ``files`` under ``root`` (``root/NAME/...``, or with ``top=False`` the content of ``NAME/``
    straight into ``root``; ``root`` is the caller's private staging folder). Returns the release folder.

    ``workers`` > 1 writes that many shard files at once, in threads: reading, the zip CRC32 and writing all
    release the GIL, so two shards on two cores take about the time of one. An error (or Ctrl-C) in any
    shard stops the others at their next block and is raised here.
    """
    base = Path(root) / files.name if top else Path(root)

    def place(member: str) -> Path:
        return base / member.split("/", 1)[1]  # members are NAME/...

    digests: dict[str, tuple[str, int]] = {}
    for member, data in files.small_members():
        place(member).parent.mkdir(parents=True, exist_ok=True)
        write_new_file(place(member), data)
        digests[member] = _small_digest(data)
    shards = [(member, place(member), obj) for member, obj in files.ordered_shards()]
    for _, path, _ in shards:
        path.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    lock = threading.Lock()

    def advance(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        with lock:
            progress(n)

    def one(member: str, path: Path, obj: Any) -> None:
        with open_new_file(path) as fh:
            sink = HashingSink(fh, hash=files.integrity)
            dump(sink, obj, advance)
            fh.flush()
            os.fsync(fh.fileno())  # durable before the folder is renamed into place
        if files.integrity:
            with lock:
                digests[member] = (sink.hexdigest(), sink.size)

    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            one(*shard)
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-writer")
        futures = [pool.submit(one, *shard) for shard in shards]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    if files.integrity:
        member, data = files.manifest(digests)
        with open_new_file(place(member)) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return base


class _Stopped(Exception):
    """Raised in a shard writer thread when another shard failed or the run was interrupted."""


def write_release_tar(
    files: ReleaseFiles,
    fh: BinaryIO,
    *,
    dump: Dump = default_dump,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Write ``files`` as one uncompressed tarball into the open file ``fh`` (members ``NAME/...``).

    The tarball starts with the toolkit's record, a pax global header listing the members
    (:func:`~persimmon_tools.staged_record.tar_record_header`): tar readers skip it, and it is what lets
    ``--force`` replace this tarball later and nothing else.
    """
    fh.write(tar_record_header(files.tar_members()))
    writer = TarWriter(fh)
    writer.add_dir(files.name)
    digests: dict[str, tuple[str, int]] = {}
    for member, data in files.small_members():
        writer.add_bytes(member, data)
        digests[member] = _small_digest(data)
    for member, obj in files.ordered_shards():
        digest = _add_shard(writer, member, obj, dump, progress, files.integrity)
        if digest is not None:
            digests[member] = digest
    if files.integrity:
        writer.add_bytes(*files.manifest(digests))
    writer.close()


def _add_shard(
    writer: TarWriter, member: str, obj: Any, dump: Dump, progress: Callable[[int], None], hash: bool
) -> tuple[str, int] | None:
    """Stream one shard into the tarball; its ``(sha256, size)`` when ``hash``."""
    sinks: list[HashingSink] = []

    def write(out: BinaryIO) -> None:
        sinks.append(HashingSink(out, hash=hash))
        dump(sinks[0], obj, progress)

    writer.add_stream(member, write)
    return (sinks[0].hexdigest(), sinks[0].size) if hash else None
