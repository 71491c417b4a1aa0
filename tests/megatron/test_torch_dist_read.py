"""Reading Megatron-Core ``torch_dist`` checkpoints: the byte layer (``dist_checkpoint``), its checks, and the
legacy-keyed view convert reads (``dist_legacy``).

The checkpoints are written by torch's own ``torch.distributed.checkpoint.save`` (single process, no process
group), an outside oracle: per-layer tensors stacked on a leading layer axis, one chunk per layer, each
layer's chunk split along its tensor-parallel dimension when ``tp > 1``, ``_extra_state`` byte objects, a
``common.pt`` written by ``torch.save``, ``metadata.json`` and the tracker, as Megatron-LM lays them out. The
weights are ADEPT's legacy release (``fixtures/tiny_release.tar``) read with ``torch.load``; the Megatron-Core
names are spelled out here (:data:`LAYER_CORE`, :data:`FLAT_CORE`), not taken from the table under test.
The helpers above the tests are used by ``tests/conversion/test_convert_torch_dist.py`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pickle
import tarfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from persimmon_tools.errors import CheckpointError, ReleaseError, UnsafeCheckpointError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.dist_checkpoint import is_torch_dist, open_torch_dist
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.shard import with_adept_module

FIXTURE_TAR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"
ITERATION = 7
_A, _M = "decoder.layers.self_attention.", "decoder.layers.mlp."
#: ADEPT's per-layer key (after ``language_model.encoder.layers.{i}.``) -> (Megatron-Core key, the dim of one
#: layer's tensor that tensor parallelism splits, None: replicated)
LAYER_CORE: dict[str, tuple[str, int | None]] = {
    "input_layernorm.weight": (_A + "linear_qkv.layer_norm_weight", None),
    "input_layernorm.bias": (_A + "linear_qkv.layer_norm_bias", None),
    "self_attention.query_key_value.weight": (_A + "linear_qkv.weight", 0),
    "self_attention.query_key_value.bias": (_A + "linear_qkv.bias", 0),
    "self_attention.q_layernorm.weight": (_A + "q_layernorm.weight", None),
    "self_attention.q_layernorm.bias": (_A + "q_layernorm.bias", None),
    "self_attention.k_layernorm.weight": (_A + "k_layernorm.weight", None),
    "self_attention.k_layernorm.bias": (_A + "k_layernorm.bias", None),
    "self_attention.dense.weight": (_A + "linear_proj.weight", 1),
    "self_attention.dense.bias": (_A + "linear_proj.bias", None),
    "post_attention_layernorm.weight": (_M + "linear_fc1.layer_norm_weight", None),
    "post_attention_layernorm.bias": (_M + "linear_fc1.layer_norm_bias", None),
    "mlp.dense_h_to_4h.weight": (_M + "linear_fc1.weight", 0),
    "mlp.dense_h_to_4h.bias": (_M + "linear_fc1.bias", 0),
    "mlp.dense_4h_to_h.weight": (_M + "linear_fc2.weight", 1),
    "mlp.dense_4h_to_h.bias": (_M + "linear_fc2.bias", None),
}
FLAT_CORE: dict[str, tuple[str, int | None]] = {
    "language_model.embedding.word_embeddings.weight": ("embedding.word_embeddings.weight", 0),
    "language_model.encoder.final_layernorm.weight": ("decoder.final_layernorm.weight", None),
    "language_model.encoder.final_layernorm.bias": ("decoder.final_layernorm.bias", None),
    "word_embeddings_for_head.weight": ("output_layer.weight", 0),
}
_LAYER = "language_model.encoder.layers."


# ---- building torch_dist checkpoints with torch's own DCP ------------------------------------------------


def legacy_release(tar: Path = FIXTURE_TAR) -> tuple[dict[str, torch.Tensor], Any]:
    """The flat ``{legacy key: tensor}`` and ``args`` of a single-shard release tarball, by ``torch.load``."""
    with tarfile.open(tar) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("model_optim_rng.pt"))
        data = tf.extractfile(member).read()
    out: dict[str, Any] = {}
    with_adept_module(lambda: out.update(ckpt=torch.load(io.BytesIO(data), weights_only=False)))
    flat: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        for k, v in obj.items():
            name = f"{prefix}.{k}" if prefix else k
            walk(v, name) if isinstance(v, dict) else flat.__setitem__(name, v)

    walk(out["ckpt"]["model"], "")
    return flat, out["ckpt"]["args"]


def core_state(legacy: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int | None]]:
    """``({core key: tensor}, {core key: split dim of the stored tensor})``: per-layer tensors stacked."""
    layers = 1 + max(int(k[len(_LAYER) :].split(".")[0]) for k in legacy if k.startswith(_LAYER))
    state, split = {}, {}
    for suffix, (core, dim) in LAYER_CORE.items():
        state[core] = torch.stack([legacy[f"{_LAYER}{i}.{suffix}"] for i in range(layers)])
        split[core] = None if dim is None else dim + 1
    for key, (core, dim) in FLAT_CORE.items():
        if key in legacy:
            state[core], split[core] = legacy[key], dim
    return state, split


def megatron_lm_args(args: Any, **changes: Any) -> argparse.Namespace:
    """Megatron-LM's spelling of a Persimmon model's args (``megatron/training/arguments.py``)."""
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        seq_length=args.seq_length,
        max_position_embeddings=args.max_position_embeddings,
        padded_vocab_size=args.padded_vocab_size,
        position_embedding_type="rope",
        rotary_percent=args.rotary_pct,
        rotary_base=args.rotary_emb_base,
        rotary_interleaved=False,
        norm_epsilon=args.layernorm_epsilon,
        normalization="LayerNorm",
        squared_relu=True,
        swiglu=False,
        qk_layernorm=True,
        add_bias_linear=True,
        add_qkv_bias=True,
        untie_embeddings_and_output_weights=True,
        group_query_attention=False,
        num_query_groups=1,
        num_experts=None,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        params_dtype=torch.bfloat16,
        bf16=True,
        ckpt_format="torch_dist",
    )
    return argparse.Namespace(**{**fields, **changes})


def _boxes(shape: tuple[int, ...], dim: int | None, tp: int, stacked: bool, per_layer: bool) -> list:
    """The chunks Megatron-Core writes: one per layer (stacked keys), each split ``tp`` ways along ``dim``."""
    layers = [(i, 1) for i in range(shape[0])] if stacked and per_layer else [(0, shape[0])]
    out = []
    for start, n in layers if stacked else [(None, None)]:
        base_off, base_size = [0] * len(shape), list(shape)
        if start is not None:
            base_off[0], base_size[0] = start, n
        parts = tp if dim is not None else 1
        for r in range(parts):
            off, size = list(base_off), list(base_size)
            if dim is not None:
                size[dim] = shape[dim] // parts
                off[dim] = r * size[dim]
            out.append((tuple(off), tuple(size)))
    return out


def _planner(boxes: dict[str, list]) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    class Chunked(DefaultSavePlanner):
        """Writes the tensors named in ``boxes`` as those chunks (what a sharded save of many ranks gives)."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            items = []
            for item in plan.items:
                chunks = boxes.get(item.index.fqn)
                if chunks is None or item.type != WriteItemType.TENSOR:
                    items.append(item)
                    continue
                data = item.tensor_data
                for off, size in chunks:
                    chunk = ChunkStorageMetadata(torch.Size(off), torch.Size(size))
                    items.append(
                        WriteItem(
                            index=MetadataIndex(item.index.fqn, off),
                            type=WriteItemType.SHARD,
                            tensor_data=TensorWriteData(chunk, data.properties, data.size),
                        )
                    )
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def resolve_data(self, item):
            if item.type != WriteItemType.SHARD:
                return super().resolve_data(item)
            tensor = self.state_dict[item.index.fqn]
            for d, (o, s) in enumerate(
                zip(item.tensor_data.chunk.offsets, item.tensor_data.chunk.sizes, strict=True)
            ):
                tensor = tensor.narrow(d, o, s)
            return tensor.contiguous().clone()

    return Chunked()


def write_torch_dist(
    root: Path,
    state: dict[str, torch.Tensor],
    split: dict[str, int | None],
    *,
    tp: int = 1,
    per_layer: bool = True,
    common: dict[str, Any] | None = None,
    iteration: int = ITERATION,
) -> Path:
    """``root/iter_{iteration:07d}`` written by ``torch.distributed.checkpoint.save`` as Megatron-LM lays it
    out (module docstring); returns the iteration folder."""
    import torch.distributed.checkpoint as dcp

    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    layers = next(t.shape[0] for k, t in state.items() if k.startswith("decoder.layers."))
    boxes = {
        k: _boxes(tuple(t.shape), split.get(k), tp, k.startswith("decoder.layers."), per_layer)
        for k, t in state.items()
    }
    extra = {
        f"decoder.layers.{m}._extra_state/shard_{i}_{layers}": None
        for m in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        )
        for i in range(layers)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(
            {**state, **extra},
            storage_writer=dcp.FileSystemWriter(folder, thread_count=2),
            planner=_planner(boxes),
        )
    torch.save(common if common is not None else {}, folder / "common.pt")
    backends = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    (folder / "metadata.json").write_text(
        json.dumps({**backends, "common_backend": "torch", "common_backend_version": 1})
    )
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def make_torch_dist(root: Path, *, tp: int = 2, args: Any = "megatron-lm", **kw: Any) -> tuple[Path, dict]:
    """The fixture release as a torch_dist checkpoint at ``root``: ``(iteration folder, legacy tensors)``."""
    legacy, legacy_args = legacy_release()
    state, split = core_state(legacy)
    if args == "megatron-lm":
        args = megatron_lm_args(legacy_args, tensor_model_parallel_size=tp)
    elif args == "adept":  # ADEPT's enum as its value: torch.save here would name the synth stand-in
        args = argparse.Namespace(**{k: getattr(v, "value", v) for k, v in vars(legacy_args).items()})
    common = {"args": args, "checkpoint_version": 3.0, "iteration": kw.get("iteration", ITERATION)}
    return write_torch_dist(
        root, state, split, tp=tp, common={**common, **kw.pop("common", {})}, **kw
    ), legacy


def rewrite_metadata(folder: Path, edit: Any) -> None:
    """Apply ``edit`` to the folder's ``.metadata`` (loaded and written back by torch's own classes)."""
    with open(folder / ".metadata", "rb") as fh:
        metadata = pickle.load(fh)
    edit(metadata)
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)


# ---- the byte layer ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> tuple[Path, dict]:
    return make_torch_dist(tmp_path_factory.mktemp("dist") / "ckpt", tp=2)


def test_open_reads_every_chunk_as_stored(tp2):
    folder, legacy = tp2
    state, _ = core_state(legacy)
    dist = open_torch_dist(folder.parent)
    assert dist.path == folder and dist.iteration == ITERATION and dist.checkpoint_version == 3.0
    assert (
        dist.args.position_embedding_type == "rope" and dist.metadata_json["sharded_backend"] == "torch_dist"
    )
    assert set(dist.tensors) == set(state)
    assert {p.name for p in map(lambda s: Path(s.path), dist.files)} >= {
        "metadata.json",
        ".metadata",
        "common.pt",
        "__0_0.distcp",
        "__0_1.distcp",
    }
    assert (
        len([k for k in dist.objects if "_extra_state/shard_" in k])
        == 4 * state[_A + "linear_qkv.weight"].shape[0]
    )
    for key, t in dist.tensors.items():
        assert t.shape == tuple(state[key].shape) and t.dtype == state[key].dtype, key
        rebuilt = torch.empty(t.shape, dtype=t.dtype)
        for c in t.chunks:
            view = rebuilt
            for d, (o, s) in enumerate(zip(c.offsets, c.sizes, strict=True)):
                view = view.narrow(d, o, s)
            view.copy_(c.tensor.materialize())
        assert torch.equal(rebuilt, state[key]), key
    qkv = dist.tensors[_A + "linear_qkv.weight"]
    assert len(qkv.chunks) == 2 * qkv.shape[0]  # one per layer and tensor-parallel rank
    c = qkv.chunks[3]  # layer 1, tensor-parallel rank 1
    assert c.offsets[0] == 1 and c.offsets[1] == c.sizes[1]
    assert torch.equal(c.select(1).materialize(), state[qkv.key][1, c.sizes[1] :])
    assert dist.finish_records() >= 0


def test_the_forms_a_source_takes(tp2, tmp_path):
    folder, _ = tp2
    assert is_torch_dist(folder.parent) and is_torch_dist(folder)
    assert open_torch_dist(folder).iteration == ITERATION
    assert (
        not is_torch_dist(FIXTURE_TAR) and not is_torch_dist(tmp_path) and not is_torch_dist(tmp_path / "no")
    )
    with pytest.raises(ReleaseError, match="is iteration 7, not 8"):
        open_torch_dist(folder, iteration=8)
    with pytest.raises(ReleaseError, match="iteration 9 has no torch_dist folder"):
        open_torch_dist(folder.parent, iteration=9)


def test_a_release_and_the_legacy_keyed_view(tp2):
    folder, legacy = tp2
    release = open_release(folder.parent)
    assert (release.kind, release.tp, release.pp, release.shards, release.iteration) == (
        "torch_dist",
        1,
        1,
        {},
        7,
    )
    assert [Path(s.path).name for s in release.source_files()][:3] == [
        "metadata.json",
        ".metadata",
        "common.pt",
    ]
    ckpt = load_release_checkpoint(release)
    assert set(ckpt.tensors) == {k for k in legacy if not k.endswith("inv_freq")}
    assert ckpt.iteration == ITERATION and ckpt.checkpoint_version == 3.0 and "args" in ckpt.top_level_keys
    for key, merged in ckpt.tensors.items():
        assert torch.equal(merged.materialize(), legacy[key]), key
        n = merged.shape[0]
        assert torch.equal(merged.read_rows(n // 2 - 1, n // 2 + 1), legacy[key][n // 2 - 1 : n // 2 + 1]), (
            key
        )
    assert len(ckpt.tensors[_LAYER + "3.self_attention.dense.weight"].parts) == 2
    assert len(ckpt.tensors[_LAYER + "3.input_layernorm.bias"].parts) == 1
    assert ckpt.finish_records() >= 0


def test_a_chunk_holding_every_layer_is_read_layer_by_layer(tmp_path):
    folder, legacy = make_torch_dist(tmp_path / "ckpt", tp=1, per_layer=False)
    dist = open_torch_dist(folder)
    assert len(dist.tensors[_M + "linear_fc1.weight"].chunks) == 1
    ckpt = load_release_checkpoint(open_release(folder))
    for key, merged in ckpt.tensors.items():
        assert torch.equal(merged.materialize(), legacy[key]), key


# ---- hostile and damaged checkpoints ---------------------------------------------------------------------


@pytest.fixture
def damaged(tmp_path) -> Path:
    return make_torch_dist(tmp_path / "ckpt", tp=2)[0]


def test_overlapping_chunks_are_refused(damaged):
    key = _A + "linear_proj.weight"

    def edit(md):
        chunks = md.state_dict_metadata[key].chunks
        chunks[1] = dataclasses.replace(chunks[1], offsets=torch.Size([0, 0, 16]))

    rewrite_metadata(damaged, edit)
    with pytest.raises(
        CheckpointError, match=f"{key}.*the chunks at \\[0, 0, 0\\] and \\[0, 0, 16\\] overlap"
    ):
        open_torch_dist(damaged)


def test_missing_chunks_are_refused(damaged):
    key = _M + "linear_fc2.bias"

    def edit(md):
        gone = md.state_dict_metadata[key].chunks.pop()
        del md.storage_data[
            next(i for i in md.storage_data if i.fqn == key and tuple(i.offset) == tuple(gone.offsets))
        ]

    rewrite_metadata(damaged, edit)
    with pytest.raises(CheckpointError, match=f"{key}.*the chunks cover .* elements \\(some are missing\\)"):
        open_torch_dist(damaged)


def test_a_chunk_outside_the_global_shape_is_refused(damaged):
    def edit(md):
        chunks = md.state_dict_metadata["embedding.word_embeddings.weight"].chunks
        chunks[1] = dataclasses.replace(chunks[1], offsets=torch.Size([900, 0]))

    rewrite_metadata(damaged, edit)
    with pytest.raises(CheckpointError, match="lies outside the global shape"):
        open_torch_dist(damaged)


def test_a_range_outside_its_file_is_refused(damaged):
    def edit(md):
        index = next(i for i in md.storage_data if i.fqn == "output_layer.weight")
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], offset=1 << 30)

    rewrite_metadata(damaged, edit)
    with pytest.raises(
        CheckpointError, match="output_layer.weight is stored at bytes \\[1073741824, .* the file has"
    ):
        open_torch_dist(damaged)


def test_a_truncated_data_file_is_refused(damaged):
    path = damaged / "__0_1.distcp"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="__0_1.distcp: .* the file has .* bytes") as err:
        open_torch_dist(damaged)
    assert "truncated" in err.value.hint


def test_a_chunk_of_another_dtype_is_refused(damaged):
    key = _A + "q_layernorm.bias"

    def edit(md):
        md.state_dict_metadata[key].properties.dtype = torch.float16

    rewrite_metadata(damaged, edit)
    with pytest.raises(
        CheckpointError, match=f"{key} chunk at \\[0, 0\\]\\): the chunk holds torch.bfloat16 \\[1, 16\\]"
    ):
        open_torch_dist(damaged)


def test_an_unknown_global_in_the_metadata_is_refused_unexecuted(damaged, tmp_path):
    import datetime

    rewrite_metadata(damaged, lambda md: setattr(md, "planner_data", datetime.date(2026, 12, 7)))
    with pytest.raises(UnsafeCheckpointError, match="references the global datetime.date") as err:
        open_torch_dist(damaged)
    assert str(damaged / ".metadata") in err.value.message
    marker = tmp_path / "ran"
    (damaged / ".metadata").write_bytes(
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c"
        + bytes([len(f"touch {marker}")])
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        open_torch_dist(damaged)
    assert not marker.exists()


class _Call:
    """Pickles as a call of ``fn(*args)`` (what a hostile ``common.pt`` would hold)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


def test_the_signal_enum_in_megatron_lm_args_is_an_inert_stand_in_and_signal_functions_refused(tmp_path):
    """Today's Megatron-LM saves ``args.exit_signal = signal.SIGTERM`` in ``common.pt``: read as a stand-in that
    records its value; ``signal``'s functions stay refused, never called."""
    import signal

    from persimmon_tools.megatron.unpickle import Opaque

    _, legacy_args = legacy_release()
    args = megatron_lm_args(legacy_args, exit_signal=signal.SIGTERM)
    folder, _ = make_torch_dist(tmp_path / "ok", tp=1, args=args)
    got = open_torch_dist(tmp_path / "ok").args
    assert isinstance(got.exit_signal, Opaque) and got.hidden_size == legacy_args.hidden_size

    torch.save({"args": _Call(signal.raise_signal, signal.SIGKILL)}, folder / "common.pt")
    with pytest.raises(UnsafeCheckpointError, match="signal.raise_signal"):
        open_torch_dist(tmp_path / "ok")


def test_a_damaged_chunk_record_is_caught_by_its_crc(damaged):
    key = _LAYER + "2.mlp.dense_h_to_4h.weight"
    part = load_release_checkpoint(open_release(damaged)).tensors[key].parts[1]
    offset = part.byte_offset + part.nbytes // 2
    with open(part.storage.path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    ckpt = load_release_checkpoint(open_release(damaged))
    with pytest.raises(CheckpointError, match="is damaged"):
        ckpt.tensors[key].materialize()
        ckpt.finish_records()


def test_another_backend_and_a_moved_iteration_are_refused(damaged):
    (damaged / "metadata.json").write_text(
        json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1})
    )
    with pytest.raises(ReleaseError, match="backends are \\('zarr', 1\\)"):
        open_release(damaged.parent)
    (damaged / "metadata.json").write_text("{not json")
    with pytest.raises(ReleaseError, match="metadata.json is not valid JSON"):
        open_release(damaged)


def test_common_iteration_must_match_the_folder(tmp_path):
    folder, _ = make_torch_dist(tmp_path / "ckpt", common={"iteration": 8})
    with pytest.raises(CheckpointError, match="says iteration 8 but its folder says 7"):
        open_torch_dist(folder.parent)


def test_a_chunk_read_far_apart_is_completed_by_finish_records_of_the_release(tmp_path):
    """A torch_dist chunk whose rows a pass reads far apart (verify looks up embedding rows by token id) stays
    open until ``finish_records(release)`` (what verify calls) reads and checks the rest, as for a shard: its
    zip lies inside a ``.distcp`` file, not at the start of a shard."""
    from persimmon_tools.megatron.records import finish_records

    legacy, legacy_args = legacy_release()
    state, split = core_state(legacy)
    state["embedding.word_embeddings.weight"] = torch.arange(1024 * 1024, dtype=torch.float32).reshape(
        1024, 1024
    )
    split["embedding.word_embeddings.weight"] = None
    write_torch_dist(tmp_path / "ckpt", state, split, common={"args": megatron_lm_args(legacy_args)})
    (chunk,) = open_torch_dist(tmp_path / "ckpt").tensors["embedding.word_embeddings.weight"].chunks
    flip_at = chunk.tensor.byte_offset + 512 * 4096 + 7
    with open(chunk.tensor.storage.path, "r+b") as fh:
        fh.seek(flip_at)
        byte = fh.read(1)
        fh.seek(flip_at)
        fh.write(bytes([byte[0] ^ 0x10]))
    release = open_release(tmp_path / "ckpt")
    (chunk,) = release.dist.tensors["embedding.word_embeddings.weight"].chunks
    rows = chunk.tensor
    assert rows.read_rows(0, 1)[0, 1] == 1 and rows.read_rows(1023, 1024)[0, 0] == 1023 * 1024  # gap not read
    with pytest.raises(CheckpointError, match="is damaged"):
        finish_records(release)


def test_megatron_lm_s_tokenizer_folder_is_the_vocabulary_unless_it_is_a_link(tp2, tmp_path):
    """``iter_*/tokenizer/tokenizer.model`` (where Megatron-LM saves it) is the vocabulary; through a linked
    ``tokenizer`` folder it is not read."""
    import shutil

    folder, _ = tp2
    copy = tmp_path / "ckpt"
    shutil.copytree(folder.parent, copy)
    iteration = copy / folder.name
    model = Path(__file__).resolve().parents[2] / "persimmon_tools" / "data" / "tiny_vocab.model"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(model, elsewhere / "tokenizer.model")
    (iteration / "tokenizer").symlink_to(elsewhere, target_is_directory=True)
    assert open_release(copy).vocab is None
    (iteration / "tokenizer").unlink()
    shutil.copytree(elsewhere, iteration / "tokenizer")
    vocab = open_release(copy).vocab
    assert vocab is not None and vocab.path == iteration / "tokenizer" / "tokenizer.model"
