"""``checkpoint_version``: read from every shard, agreed by all, refused below 2.0, by convert and verify alike.

Megatron-LM's loader reorders the fused query_key_value rows of checkpoints older than 2.0
(``fix_query_key_value_ordering``); persimmon-tools does not, so it refuses them rather than copy rows in an
order Megatron never computes with. An absent version is accepted: ADEPT's own loader never reads the key.
Every tampered shard is checked with ``torch.load`` (the outside oracle) to hold what the test meant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import CheckpointError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.consistency import check_checkpoint_version
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.build import build_release, write_release_folder
from persimmon_tools.synth.shard import with_adept_module
from persimmon_tools.verification.source_merge import load_source

IT = "iter_0001251"
ABSENT = object()


def _release(tmp_path: Path, name: str, versions: dict, *, tp: int = 1, pp: int = 1) -> Path:
    """A tiny release whose shards hold ``versions[(tp_rank, pp_rank)]`` (ABSENT: no key; unlisted: 3.0)."""
    rel = build_release(seed=0, tp=tp, pp=pp)
    for rank, value in versions.items():
        if value is ABSENT:
            del rel.objects[rank]["checkpoint_version"]
        else:
            rel.objects[rank]["checkpoint_version"] = value
    return write_release_folder(rel, tmp_path / name)


def _shard(folder: Path, rank: tuple[int, int], pp: int) -> Path:
    name = f"mp_rank_{rank[0]:02d}" + (f"_{rank[1]:03d}" if pp > 1 else "")
    return folder / IT / name / "model_optim_rng.pt"


def _torch_load(path: Path) -> dict:
    box: list = []
    with_adept_module(lambda: box.append(torch.load(path, map_location="cpu", weights_only=False)))
    return box[0]


def _stored(folder: Path, rank=(0, 0), pp: int = 1):
    obj = _torch_load(_shard(folder, rank, pp))
    return obj.get("checkpoint_version", ABSENT)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b if a is not ABSENT else b is ABSENT


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """An untouched tiny release converted once: the folder verify --reference is run against."""
    base = tmp_path_factory.mktemp("ckpt-version")
    source = write_release_folder(build_release(seed=0), base / "rel")
    convert(source, base / "hf", ConvertOptions())
    return base / "hf"


# ---- the rule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2.0, 3.0, 3, 2, 10.5])
def test_the_rule_accepts_numbers_from_2(value):
    assert check_checkpoint_version(value, "x") == float(value)


def test_the_rule_accepts_absent():
    assert check_checkpoint_version(None, "x") is None


@pytest.mark.parametrize("value", [0, 1.0, 1.99, -3.0, 0.0])
def test_the_rule_refuses_versions_below_2(value):
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_version(value, "iter_0000001/mp_rank_00")
    msg = err.value.message
    assert msg.startswith("iter_0000001/mp_rank_00: checkpoint_version is ")
    assert "fix_query_key_value_ordering" in msg and "query_key_value rows" in msg
    assert "Megatron-LM" in err.value.hint and "3.0" in err.value.hint


@pytest.mark.parametrize(
    "value", ["3.0", float("nan"), float("inf"), -float("inf"), True, False, [3.0], 10**400, b"3"]
)
def test_the_rule_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(CheckpointError, match=r"^where: checkpoint_version is .*Megatron saves a number"):
        check_checkpoint_version(value, "where")


# ---- convert (CLI), inspect and verify --reference on whole releases ----------------------------------------


@pytest.mark.parametrize(("value", "recorded"), [(ABSENT, None), (2.0, 2.0), (3.0, 3.0), (3, 3)])
def test_accepted_versions_convert_and_are_recorded(tmp_path, value, recorded):
    source = _release(tmp_path, "rel", {(0, 0): value})
    assert _same(_stored(source), value)  # the oracle: the shard holds what we meant
    out = tmp_path / "out"
    result = cli("convert", source, out, "--no-verify")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "conversion.json").read_text())
    assert record["checkpoint_version"] == recorded and type(record["checkpoint_version"]) is type(recorded)
    assert load_release_checkpoint(open_release(source)).checkpoint_version == recorded
    assert load_source(source).checkpoint_version == (None if recorded is None else float(recorded))


def test_absent_version_also_passes_verify(tmp_path, converted):
    source = _release(tmp_path, "rel", {(0, 0): ABSENT})
    assert _stored(source) is ABSENT
    result = cli(
        "verify", converted, "--reference", source, "--loader", "persimmon-tools", "--no-source-hash"
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", [0, 1.0])
def test_old_versions_are_refused_by_convert_verify_and_inspect(tmp_path, converted, value):
    source = _release(tmp_path, "rel", {(0, 0): value})
    assert _same(_stored(source), value)
    result = cli("convert", source, tmp_path / "out")
    assert_clean_failure(result, 1)
    assert f"mp_rank_00: checkpoint_version is {value}, older than 2.0" in result.stderr
    assert "fix_query_key_value_ordering" in result.stderr
    assert "Hint: load the checkpoint with a current Megatron-LM and save it again" in result.stderr
    assert not (tmp_path / "out").exists()
    # verify's independent reader refuses it on its own (before the converter's reader is asked)
    with pytest.raises(CheckpointError, match=r"checkpoint_version .* is below 2\.0"):
        load_source(source)
    result = cli("verify", converted, "--reference", source, "--no-source-hash")
    assert_clean_failure(result, 1)
    assert "is below 2.0" in result.stderr and "fix_query_key_value_ordering" in result.stderr
    result = cli("inspect", source)
    assert_clean_failure(result, 1)
    assert "older than 2.0" in result.stderr


@pytest.mark.parametrize("value", ["3.0", float("nan"), True, None])
def test_malformed_versions_are_refused(tmp_path, converted, value):
    """A string, NaN or bool is refused; an explicit None counts as absent (as ADEPT's loader sees it)."""
    source = _release(tmp_path, "rel", {(0, 0): value})
    assert _same(_stored(source), value)
    result = cli("convert", source, tmp_path / "out", "--no-verify")
    verified = cli(
        "verify", converted, "--reference", source, "--loader", "persimmon-tools", "--no-source-hash"
    )
    if value is None:
        assert result.exit_code == 0 and verified.exit_code == 0, result.output + verified.output
        return
    assert_clean_failure(result, 1)
    assert "checkpoint_version is " in result.stderr and "Megatron saves a number" in result.stderr
    assert_clean_failure(verified, 1)
    assert "not a finite number" in verified.stderr


# ---- shards that disagree ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "pp", "versions", "shown"),
    [
        (2, 1, {(1, 0): 2.0}, ("mp_rank_00 holds checkpoint_version 3.0", "mp_rank_01 holds checkpoint_version 2.0")),
        (1, 2, {(0, 1): ABSENT}, ("mp_rank_00_000 holds checkpoint_version 3.0", "mp_rank_00_001 holds no checkpoint_version")),
        (2, 2, {(0, 0): ABSENT, (1, 0): ABSENT, (0, 1): ABSENT}, ("mp_rank_00_000 holds no", "mp_rank_01_001 holds checkpoint_version 3.0")),
    ],
    ids=["tp2-numbers", "pp2-absent", "tp2pp2-one-left"],
)  # fmt: skip
def test_disagreeing_shards_are_refused(tmp_path, converted, tp, pp, versions, shown):
    source = _release(tmp_path, "rel", versions, tp=tp, pp=pp)
    for rank, value in versions.items():
        assert _same(_stored(source, rank, pp), value)
    with pytest.raises(CheckpointError) as err:
        load_release_checkpoint(open_release(source))
    assert "shards disagree on their checkpoint_version" in err.value.message
    for part in shown:
        assert part in err.value.message
    result = cli("convert", source, tmp_path / "out")
    assert_clean_failure(result, 1)
    assert "shards disagree on their checkpoint_version" in result.stderr
    with pytest.raises(CheckpointError, match="records checkpoint_version"):
        load_source(source)
    result = cli("verify", converted, "--reference", source, "--no-source-hash")
    assert_clean_failure(result, 1)
    assert "records checkpoint_version" in result.stderr


@pytest.mark.parametrize("same", [(3, 3.0), (float("nan"), float("nan")), (ABSENT, None)])
def test_equal_versions_spelled_alike_agree(tmp_path, same):
    """3 and 3.0 agree (and convert); NaN in every shard is refused as NaN, not as a disagreement."""
    source = _release(tmp_path, "rel", {(0, 0): same[0], (1, 0): same[1]}, tp=2)
    if isinstance(same[0], float):
        for reader in (lambda: load_release_checkpoint(open_release(source)), lambda: load_source(source)):
            with pytest.raises(CheckpointError) as err:
                reader()
            assert "disagree" not in err.value.message and "nan" in err.value.message
        return
    want = None if same[0] is ABSENT else same[0]
    assert load_release_checkpoint(open_release(source)).checkpoint_version == want
    assert load_source(source).checkpoint_version == (None if want is None else float(want))
