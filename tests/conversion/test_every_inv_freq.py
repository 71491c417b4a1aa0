"""Every layer's stored ``inv_freq``, on every TP rank and PP stage, is checked against the rotary base.

ADEPT computes each layer with the buffer stored for it (a persistent buffer); HF Persimmon recomputes one
from ``rope_theta``. A layer k > 0 whose buffer came from base 10000 instead of 25000 (on one TP rank only,
or on one pipeline stage only) must be refused by convert (naming the layer, the shard and the base the
buffer implies) and by verify --reference (its own check); releases without the buffers still convert.
``torch.load`` confirms each tampered shard holds what the test meant.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.conversion.config import derive_dims
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.conversion.inspect import inspect_source
from persimmon_tools.errors import CheckpointError, ConfigError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.lazy import StorageRef
from persimmon_tools.megatron.ptwriter import TensorSpec
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.build import build_release, write_release_folder
from persimmon_tools.synth.shard import with_adept_module
from persimmon_tools.verification.source_merge import load_source

IT = "iter_0001251"
INV = "self_attention.rotary_emb.inv_freq"
RD = 8  # tiny preset: head_dim 16, rotary_pct 0.5


def inv_freq(base: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (1.0 / (base ** (torch.arange(0, RD, 2).float() / RD))).to(dtype)


def _shard(folder: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return folder / IT / name / "model_optim_rng.pt"


def _torch_load_encoder(path: Path) -> dict:
    box: list = []
    with_adept_module(lambda: box.append(torch.load(path, map_location="cpu", weights_only=False)))
    return box[0]["model"]["language_model"]["encoder"]


def _release(tmp_path: Path, *, tp: int = 1, pp: int = 1, edits=(), dtype=torch.bfloat16, drop=()) -> Path:
    """A tiny release; ``edits``: ((tp_rank, pp_rank), stage-local layer, tensor) buffers to replace;
    ``drop``: (pp_rank, stage-local layer) whose buffer is removed from every TP rank (None: every layer)."""
    rel = build_release(seed=0, tp=tp, pp=pp, dtype=dtype)
    for rank, layer, value in edits:
        rel.objects[rank]["model"]["language_model"]["encoder"][f"layers.{layer}.{INV}"] = TensorSpec.of(
            value
        )
    for (_, s), obj in rel.objects.items():
        encoder = obj["model"]["language_model"]["encoder"]
        for key in [k for k in encoder if k.endswith(INV)]:
            if (s, None) in drop or (s, int(key.split(".")[1])) in drop:
                del encoder[key]
    folder = write_release_folder(rel, tmp_path / "rel")
    for rank, layer, value in edits:  # the oracle: the shard holds the buffer we meant, its neighbours not
        encoder = _torch_load_encoder(_shard(folder, *rank, pp))
        assert torch.equal(encoder[f"layers.{layer}.{INV}"], value)
        assert all(torch.equal(v, inv_freq(25000.0, dtype)) for k, v in encoder.items() if k.endswith(INV)
                   and k != f"layers.{layer}.{INV}")  # fmt: skip
    return folder


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """An untouched tiny release converted once: the folder verify --reference is run against."""
    base = tmp_path_factory.mktemp("inv-freq")
    source = write_release_folder(build_release(seed=0), base / "rel")
    convert(source, base / "hf", ConvertOptions())
    return base / "hf"


def _implies_10000(text: str) -> bool:
    return re.search(r"implies (a rotary base of )?about (99[5-9]\d|100[0-4]\d)\b", text) is not None


# ---- one layer k > 0 with base 10000 ------------------------------------------------------------------------

CASES = {
    # name: (tp, pp, (tp_rank, pp_rank), stage-local layer, global layer, shard label)
    "tp2-rank1": (2, 1, (1, 0), 3, 3, "iter_0001251/mp_rank_01"),
    "pp2-stage1": (1, 2, (0, 1), 1, 4, "iter_0001251/mp_rank_00_001"),
    "tp2pp2-rank1-stage1": (2, 2, (1, 1), 2, 5, "iter_0001251/mp_rank_01_001"),
}


@pytest.mark.parametrize("name", CASES)
def test_convert_refuses_one_wrong_layer_copy(tmp_path, name):
    tp, pp, rank, local, layer, label = CASES[name]
    folder = _release(tmp_path, tp=tp, pp=pp, edits=[(rank, local, inv_freq(10000.0))])
    with pytest.raises(ConfigError) as err:
        derive_dims(load_release_checkpoint(open_release(folder)))
    msg = err.value.message
    assert f"the stored inv_freq of layer {layer} in {label}" in msg and _implies_10000(msg), msg
    assert "rotary base 25000.0 (args.rotary_emb_base)" in msg
    assert msg.count("disagrees with the stored inv_freq") == 1  # the other copies and layers are right
    if pp > 1:
        assert f"(as language_model.encoder.layers.{local}.{INV})" in msg
    result = cli("convert", folder, tmp_path / "out")
    assert_clean_failure(result, 1)
    assert f"layer {layer} in {label}" in result.stderr and _implies_10000(result.stderr)
    assert not (tmp_path / "out").exists()
    info = inspect_source(folder)  # inspect still describes the release, and says why it cannot convert
    assert f"layer {layer} in {label}" in info["dims_error"]


def test_export_from_such_a_release_is_refused(tmp_path):
    """export reads a Megatron source through the converter's reader and derive_dims: the same refusal."""
    from persimmon_tools.export.export import ExportOptions, export_release

    folder = _release(tmp_path, tp=1, pp=2, edits=[((0, 1), 1, inv_freq(10000.0))])
    with pytest.raises(ConfigError, match="layer 4 in iter_0001251/mp_rank_00_001"):
        export_release(folder, tmp_path / "exported", ExportOptions())
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("name", CASES)
def test_verify_refuses_one_wrong_layer_copy(tmp_path, converted, name):
    tp, pp, rank, local, layer, label = CASES[name]
    folder = _release(tmp_path, tp=tp, pp=pp, edits=[(rank, local, inv_freq(10000.0))])
    result = cli("verify", converted, "--reference", folder, "--no-source-hash")
    assert_clean_failure(result, 1)
    if tp > 1:  # verify's own merge compares replicated copies byte for byte, and names both shards
        want = f"layers.{layer}.{INV} is replicated across tensor-parallel ranks, but rank 1 differs"
        assert want in result.stderr and label in result.stderr, result.stderr
        with pytest.raises(CheckpointError, match=re.escape(want)):
            load_source(folder)
    else:
        assert f"layer {layer}'s stored inv_freq in {label}" in result.stderr and _implies_10000(
            result.stderr
        )
        assert "rotary base" in result.stderr and "Hint: " in result.stderr


def test_verify_refuses_a_layer_wrong_on_every_tp_rank(tmp_path, converted):
    """Both TP copies of layer 4 (stage 1, local layer 1) agree with each other, not with the base."""
    edits = [((t, 1), 1, inv_freq(10000.0)) for t in (0, 1)]
    folder = _release(tmp_path, tp=2, pp=2, edits=edits)
    result = cli("verify", converted, "--reference", folder, "--no-source-hash")
    assert_clean_failure(result, 1)
    assert "layer 4's stored inv_freq in iter_0001251/mp_rank_00_001" in result.stderr
    assert _implies_10000(result.stderr)
    result = cli("convert", folder, tmp_path / "out")
    assert_clean_failure(result, 1)
    for label in ("iter_0001251/mp_rank_00_001", "iter_0001251/mp_rank_01_001"):
        assert f"layer 4 in {label}" in result.stderr


def test_copies_within_rounding_but_not_identical_are_refused(tmp_path):
    """fp32 buffers: rank 1's copy of layer 2 is one ulp off (within rounding of the base, but replicated
    buffers are identical on every rank in a real checkpoint); both readers refuse."""
    good = inv_freq(25000.0, torch.float32)
    nudged = good.clone()
    nudged[2] = torch.nextafter(good[2], torch.tensor(1.0))
    folder = _release(tmp_path, tp=2, dtype=torch.float32, edits=[((1, 0), 2, nudged)])
    with pytest.raises(ConfigError) as err:
        derive_dims(load_release_checkpoint(open_release(folder)))
    assert "the inv_freq of layer 2 differs between iter_0001251/mp_rank_00 and iter_0001251/mp_rank_01" in (
        err.value.message
    )
    assert "disagrees with the stored" not in err.value.message
    with pytest.raises(CheckpointError, match="is replicated across tensor-parallel ranks"):
        load_source(folder)


# ---- controls: right buffers, and no buffers ------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp", "drop"), [(2, 2, ()), (1, 1, {(0, None)}), (2, 2, {(1, 1), (0, 0)})])
def test_right_or_missing_buffers_convert_and_verify(tmp_path, converted, tp, pp, drop):
    """The untouched release, and releases without some or all buffers, convert and verify (the spec asks a
    converter to tolerate missing inv_freq)."""
    folder = _release(tmp_path, tp=tp, pp=pp, drop=drop)
    stored = [k for k, _ in load_source(folder).tensors.items() if k.endswith(INV)]
    assert len(stored) == 6 - (6 if (0, None) in drop else len(drop))
    result = cli("convert", folder, tmp_path / "out", "--no-verify")
    assert result.exit_code == 0, result.output
    result = cli(
        "verify", converted, "--reference", folder, "--loader", "persimmon-tools", "--no-source-hash"
    )
    assert result.exit_code == 0, result.output


def test_the_check_reads_only_the_buffers(tmp_path, monkeypatch):
    """derive_dims reads every rank's buffer of every layer (tp x layers reads of rotary_dim/2 values) and no
    other tensor bytes."""
    folder = _release(tmp_path, tp=2, pp=2)
    ckpt = load_release_checkpoint(open_release(folder))
    reads: list[int] = []
    real = StorageRef.read

    def read(self, offset, size):
        reads.append(size)
        return real(self, offset, size)

    monkeypatch.setattr(StorageRef, "read", read)
    derive_dims(ckpt)
    assert len(reads) == 2 * 6 + 1  # every copy, and layer 0's once more for the rotary dimension
    assert set(reads) == {RD // 2 * 2}  # bf16: 4 values of 2 bytes each
