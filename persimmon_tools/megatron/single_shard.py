"""A SOURCE that is a single shard: one ``model_optim_rng.pt`` file, or the ``mp_rank_XX`` (``mp_rank_XX_YYY``)
folder holding it. Both are a TP=1, PP=1 release; the ``iter_*`` folder above gives the iteration and the
release folder above that the vocabulary and the variant. A rank folder that is one rank of a sharded
release (other ``mp_rank_*`` folders beside it, a rank other than 0, or its own args saying TP or PP > 1) is
refused before anything else is read, naming the folder to give instead. Used by
:func:`persimmon_tools.megatron.release.open_release`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.release import (
    ITER_DIR_RE,
    RANK_DIR_RE,
    SHARD_FILES,
    SHARD_LIKE_RE,
    SHARD_RE,
    VOCAB,
    Release,
    holds_release_files,
    release_file,
)
from persimmon_tools.megatron.variant import decide_variant


def single_pt(source: Path) -> Release:
    """One ``model_optim_rng.pt``: a TP=1, PP=1 release; ``iter_*`` above it gives the iteration."""
    here = Path(os.path.abspath(source))
    rel = f"{here.parent.parent.name}/{here.parent.name}/{here.name}"
    m = SHARD_RE.match(rel)
    if m is None and SHARD_LIKE_RE.search(rel):
        raise ReleaseError(
            f"{source}: its folders {rel} are not spelled iter_<digits>/mp_rank_<2 digits>[_<3 digits>] (ASCII digits)",
            hint="rename the folders the way Megatron writes them (iter_0001251/mp_rank_00)",
        )
    found_vocab = None
    for up in (here.parent.parent.parent, here.parent.parent, here.parent):
        if os.path.lexists(up / VOCAB):
            found_vocab = release_file(up / VOCAB, VOCAB)
            break
    witnesses = []
    root = here.parent.parent.parent
    if m is not None and holds_release_files(root):
        witnesses = [(f"release folder {root.name} (parent of {here.parent.parent.name})", root.name)]
    variant, variant_from = decide_variant(witnesses)
    return Release(
        source=source,
        kind="pt",
        iteration=int(m["it"]) if m else None,
        shards={(0, 0): ByteSource.whole_file(source, what="the checkpoint")},
        tp=1,
        pp=1,
        vocab=found_vocab,
        variant=variant,
        variant_from=variant_from if witnesses else "unknown: the .pt file is not inside a release folder",
        shard_dirs={(0, 0): rel.rsplit("/", 1)[0] if m else here.name},
    )


def rank_folder(source: Path) -> Release:
    """An ``mp_rank_XX`` / ``mp_rank_XX_YYY`` folder holding a shard file: that shard, read as the ``.pt`` would be
    (:func:`single_pt`), when it is a whole checkpoint (TP=1, PP=1); one rank of a sharded release is
    refused, naming the folders to give instead."""
    here = Path(os.path.abspath(source))
    files = [source / n for n in SHARD_FILES if os.path.lexists(source / n)]
    if len(files) > 1:
        raise ReleaseError(
            f"{source}: two checkpoint files, {files[0].name} and {files[1].name}",
            hint="keep either model_optim_rng.pt or model_rng.pt",
        )
    m = RANK_DIR_RE.fullmatch(here.name)
    assert m is not None  # open_release checked the name
    rank = (int(m["tp"]), int(m["pp"] or 0))
    shard = release_file(files[0], files[0].name)  # a regular file, not a link, as in a release folder
    siblings = sorted(
        p.name
        for p in here.parent.iterdir()
        if p.name != here.name and p.name.startswith("mp_rank_") and p.is_dir()
    )
    reason = (
        f"{here.parent.name} also holds {', '.join(siblings[:4])}{' ...' if len(siblings) > 4 else ''}"
        if siblings
        else f"it is rank {rank} (a single-shard checkpoint is mp_rank_00)"
        if rank != (0, 0)
        else _sharded_args(shard)
    )
    if reason:
        where = (
            f"the iter_* folder ({here.parent}) or the release folder above it"
            if ITER_DIR_RE.fullmatch(here.parent.name)
            else "the iter_* folder holding every mp_rank_* folder of that iteration, or the release folder"
        )
        raise ReleaseError(
            f"{source} is one rank of a sharded checkpoint ({reason}); a single mp_rank folder converts only "
            "when the checkpoint is not sharded (TP=1, PP=1)",
            hint=f"give {where} (or the release tarball): every tensor/pipeline rank is needed",
        )
    return replace(single_pt(files[0]), source=source, shards={(0, 0): shard})


def _sharded_args(src: ByteSource) -> str:
    """Why the shard's own args say it is one of several ("" when they do not; the pickle only is read)."""
    from persimmon_tools.megatron.torchzip import load_checkpoint

    obj = load_checkpoint(src).obj
    args = obj.get("args") if isinstance(obj, dict) else None
    said = [
        f"args.{name} = {value}"
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size")
        if isinstance(value := getattr(args, name, None), int) and value > 1
    ]
    return ", ".join(said)
