"""Shards that do not belong together, or not in their place, are refused before anything is merged.

Every broken input is built here from a synthetic release: folders swapped, a shard's iteration or args
rewritten, layer keys respelled, iteration folders spelled twice. Each test also converts (or opens) the
untouched control, so it fails if the check is missing rather than if the input is broken some other way.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_inputs import fixture_members, tar_with
from reliability_cases import assert_clean_failure

from persimmon_tools import ConvertOptions, convert, load_release_checkpoint, open_release
from persimmon_tools.cli import main
from persimmon_tools.errors import CheckpointError, ReleaseError
from persimmon_tools.synth.build import build_release, write_release_folder

IT = "iter_0001251"


def _folder(tmp_path: Path, name: str = "rel", *, mutate=None, **kw) -> Path:
    rel = build_release(seed=0, **kw)
    if mutate is not None:
        mutate(rel.objects)
    return write_release_folder(rel, tmp_path / name)


def _encoder(objects, rank):
    return objects[rank]["model"]["language_model"]["encoder"]


def _load(folder: Path):
    return load_release_checkpoint(open_release(folder))


# ---- pipeline stages out of place ---------------------------------------------------------------------


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


@pytest.mark.parametrize(("pp", "i", "j"), [(2, 0, 1), (3, 0, 1), (3, 1, 2), (3, 0, 2)])
def test_swapped_pipeline_folders_are_refused(tmp_path, pp, i, j):
    folder = _folder(tmp_path, pp=pp)
    assert len(_load(folder).tensors)  # control: the genuine layout loads
    _swap(folder / IT / f"mp_rank_00_{i:03d}", folder / IT / f"mp_rank_00_{j:03d}")
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    assert "pipeline stages are out of order" in err.value.message
    assert (
        "only the first stage holds" in err.value.message or "only the last stage holds" in err.value.message
    )
    assert "mp_rank_00_00" in err.value.message and "swapped" in err.value.hint


def test_swapped_pipeline_folders_of_a_tp2_release_and_through_the_cli(tmp_path):
    folder = _folder(tmp_path, tp=2, pp=2)
    for t in (0, 1):
        _swap(folder / IT / f"mp_rank_{t:02d}_000", folder / IT / f"mp_rank_{t:02d}_001")
    with pytest.raises(CheckpointError, match="pipeline stages are out of order"):
        convert(folder, tmp_path / "out", ConvertOptions())
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out2")])
    assert_clean_failure(result, 1)
    assert "pipeline stages are out of order" in result.stderr and "Hint: " in result.stderr
    assert not (tmp_path / "out2").exists()


def test_middle_stages_swapped_are_found_by_the_saving_rank(tmp_path):
    """Middle stages hold only layers; args.rank (set per process by Megatron) says which stage saved them."""

    def with_ranks(objects):
        for (t, p), obj in objects.items():
            obj["args"].rank, obj["args"].local_rank, obj["args"].world_size = p * 2 + t, t, 6 * 2

    folder = _folder(tmp_path, tp=2, pp=6, mutate=with_ranks)
    assert len(_load(folder).tensors)  # control: per-rank fields differ, and that is fine
    _swap(folder / IT / "mp_rank_01_002", folder / IT / "mp_rank_01_003")
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    assert "mp_rank_01_002 was saved by global rank" in err.value.message


@pytest.mark.parametrize(
    ("tp", "pp", "a", "b"),
    [
        (2, 1, "mp_rank_00", "mp_rank_01"),
        (2, 3, "mp_rank_00_001", "mp_rank_01_001"),
        (1, 6, "mp_rank_00_002", "mp_rank_00_003"),
    ],
)
def test_make_release_records_ranks_so_swapped_tp_ranks_and_middle_stages_are_found(tmp_path, tp, pp, a, b):
    """make-release writes each shard's ``args.rank`` like Megatron's processes do, so even swaps that keep
    every stage role (TP ranks, middle stages) are caught."""
    folder = _folder(tmp_path, tp=tp, pp=pp)
    assert len(_load(folder).tensors)  # control
    ranks = {obj["args"].rank for obj in build_release(seed=0, tp=tp, pp=pp).objects.values()}
    assert ranks == set(range(tp * pp))
    _swap(folder / IT / a, folder / IT / b)
    with pytest.raises(CheckpointError, match="was saved by global rank"):
        _load(folder)


# ---- iteration and args ------------------------------------------------------------------------------


def test_a_shard_from_another_iteration_is_refused(tmp_path):
    def other_iteration(objects):
        objects[(0, 1)]["iteration"] = 1000

    folder = _folder(tmp_path, pp=2, mutate=other_iteration)
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    msg = err.value.message
    assert "disagree on the iteration" in msg and "1251" in msg and "1000" in msg and "mp_rank_00_001" in msg


def test_shard_iteration_must_match_its_folder(tmp_path):
    def all_other(objects):
        for obj in objects.values():
            obj["iteration"] = 1000

    folder = _folder(tmp_path, tp=2, mutate=all_other)
    with pytest.raises(CheckpointError, match=r"says iteration 1000 but its folder says 1251"):
        _load(folder)
    pt = folder / IT / "mp_rank_00" / "model_optim_rng.pt"  # a lone .pt inside iter_* is checked too
    with pytest.raises(CheckpointError, match="folder says 1251"):
        load_release_checkpoint(open_release(pt))


@pytest.mark.parametrize("bad", ["1251", 1251.0, True, -1])
def test_iteration_of_the_wrong_type_is_refused(tmp_path, bad):
    def set_bad(objects):
        objects[(0, 0)]["iteration"] = bad

    with pytest.raises(CheckpointError, match="'iteration' is"):
        _load(_folder(tmp_path, mutate=set_bad))


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 999), ("hidden_dropout", 0.1), ("consumed_train_samples", 1), ("data_path", ["other"])],
)
def test_a_shard_from_another_run_is_refused_naming_the_field(tmp_path, field, value):
    def other_run(objects):
        setattr(objects[(1, 0)]["args"], field, value)

    folder = _folder(tmp_path, tp=2, mutate=other_run)
    with pytest.raises(CheckpointError) as err:
        _load(folder)
    msg = err.value.message
    assert "disagree on their training args" in msg and f"{field}=" in msg and repr(value) in msg
    assert f"{IT}/mp_rank_00" in msg and f"{IT}/mp_rank_01" in msg
    assert "different training runs" in err.value.hint


def test_args_missing_on_one_shard_or_one_field_are_refused(tmp_path):
    def drop_field(objects):
        del objects[(0, 1)]["args"].qk_layernorm

    with pytest.raises(CheckpointError, match="no qk_layernorm"):
        _load(_folder(tmp_path, "a", pp=2, mutate=drop_field))

    def drop_args(objects):
        del objects[(0, 1)]["args"]

    with pytest.raises(CheckpointError, match="holds training args but .*mp_rank_00_001 holds none"):
        _load(_folder(tmp_path, "b", pp=2, mutate=drop_args))


def test_only_per_rank_fields_may_differ(tmp_path):
    from persimmon_tools.megatron.consistency import PER_RANK_ARGS

    assert {
        "rank",
        "local_rank",
    } <= PER_RANK_ARGS and "pipeline_model_parallel_split_rank" not in PER_RANK_ARGS

    def per_rank(objects):
        for (t, p), obj in objects.items():
            for i, name in enumerate(sorted(PER_RANK_ARGS)):
                setattr(obj["args"], name, 10 * i + t + 2 * p)
            obj["args"].rank = t + 2 * p  # where Megatron's process (t, p) sits in a world of 4

    assert _load(_folder(tmp_path, "a", tp=2, pp=2, mutate=per_rank)).tensors

    def split_rank(objects):
        objects[(1, 1)]["args"].pipeline_model_parallel_split_rank = 1

    with pytest.raises(CheckpointError, match="pipeline_model_parallel_split_rank"):
        _load(_folder(tmp_path, "b", tp=2, pp=2, mutate=split_rank))


def test_non_namespace_args_are_compared_whole(tmp_path):
    def as_dicts(objects):
        for obj in objects.values():
            obj["args"] = ["not", "a", "namespace"]
        objects[(1, 0)]["args"] = ["not", "a", "Namespace"]

    with pytest.raises(CheckpointError, match="disagree on their args"):
        _load(_folder(tmp_path, tp=2, mutate=as_dicts))


def test_nan_and_nested_args_values_compare_equal(tmp_path):
    def odd_values(objects):
        for obj in objects.values():
            obj["args"].weird = float("nan")
            obj["args"].nested = {"a": [1, (2, 3)], "ns": argparse.Namespace(x=1)}

    assert _load(_folder(tmp_path, tp=2, mutate=odd_values)).tensors


# ---- layer keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["05", "+5", "٥", "５", " 5", "5_"])
def test_non_canonical_layer_numbers_are_refused(tmp_path, spelling):
    def respell(objects):
        enc = _encoder(objects, (0, 0))
        renamed = OrderedDict(
            (k.replace("layers.5.", f"layers.{spelling}.", 1) if k.startswith("layers.5.") else k, v)
            for k, v in enc.items()
        )
        objects[(0, 0)]["model"]["language_model"]["encoder"] = renamed

    with pytest.raises(CheckpointError) as err:
        _load(_folder(tmp_path, mutate=respell))
    assert f"layers.{spelling}." in err.value.message and "layer number" in err.value.message


def test_one_layer_under_two_spellings_is_refused(tmp_path):
    """``layers.5.*`` and ``layers.05.*`` side by side: before, one set was written and the other dropped."""

    def duplicate(objects):
        enc = _encoder(objects, (0, 0))
        for k in [k for k in enc if k.startswith("layers.5.")]:
            enc[k.replace("layers.5.", "layers.05.")] = enc[k]

    folder = _folder(tmp_path, mutate=duplicate)
    with pytest.raises(CheckpointError, match=r"layers\.05\."):
        convert(folder, tmp_path / "out", ConvertOptions())
    assert not (tmp_path / "out").exists()


def test_non_canonical_layer_numbers_in_a_later_stage(tmp_path):
    def respell(objects):
        enc = _encoder(objects, (0, 1))
        objects[(0, 1)]["model"]["language_model"]["encoder"] = OrderedDict(
            (k.replace("layers.0.", "layers.00.", 1), v) for k, v in enc.items()
        )

    with pytest.raises(CheckpointError, match=r"mp_rank_00_001.*layers\.00\."):
        _load(_folder(tmp_path, pp=2, mutate=respell))


# ---- folder spellings ----------------------------------------------------------------------------------


def test_one_iteration_under_two_folder_names_is_refused(tmp_path):
    folder = _folder(tmp_path)
    shutil.copytree(folder / IT, folder / "iter_1251")
    with pytest.raises(ReleaseError) as err:
        open_release(folder)
    assert "iteration 1251 appears under two folder names" in err.value.message
    assert "iter_0001251" in err.value.message and "iter_1251" in err.value.message
    shutil.rmtree(folder / IT)  # one spelling alone (not Megatron's, but unambiguous) is read
    assert open_release(folder).shard_label((0, 0)) == "iter_1251/mp_rank_00"


@pytest.mark.parametrize(
    "name", ["iter_0001251/mp_rank_0", "iter_0001251/mp_rank_٠٠", "iter_١٢٥١/mp_rank_00"]
)
def test_shard_folders_not_spelled_canonically_are_refused(tmp_path, name):
    folder = _folder(tmp_path)
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder / IT / "mp_rank_00", target)
    with pytest.raises(ReleaseError, match="not spelled iter_<digits>/mp_rank_<2 digits>"):
        open_release(folder)


def test_non_ascii_rank_folder_is_not_read_as_a_rank(tmp_path):
    """``\\d`` accepts Arabic-Indic digits: ``mp_rank_٠١`` must not become tensor rank 1."""
    folder = _folder(tmp_path, tp=2)
    os.rename(folder / IT / "mp_rank_01", folder / IT / "mp_rank_٠١")
    with pytest.raises(ReleaseError, match="not spelled"):
        open_release(folder)


def test_one_iteration_under_two_member_names_in_a_tar_is_refused(releases, tmp_path):
    members = fixture_members(releases["tar"])
    assert open_release(tar_with(tmp_path / "ok.tar", members)).iteration == 1251  # control
    pt_info, pt_data = next((m, d) for m, d in members if m.name.endswith(".pt"))
    twin = copy.copy(pt_info)
    twin.name = pt_info.name.replace("iter_0001251", "iter_01251")
    with pytest.raises(ReleaseError, match="iteration 1251 appears under two folder names"):
        open_release(tar_with(tmp_path / "twice.tar", [*members, (twin, pt_data)]))


def test_cyclic_or_exploding_args_are_refused_not_walked_forever(tmp_path, monkeypatch):
    from persimmon_tools.megatron import consistency

    def cyclic(objects):
        for obj in objects.values():
            loop: list = []
            loop.append(loop)
            obj["args"].loop = loop

    # the load's own tree check meets the cycle first; the args comparison would refuse it too
    with pytest.raises(CheckpointError, match="too large or too deeply nested|is not a tree"):
        _load(_folder(tmp_path, "a", tp=2, mutate=cyclic))

    def shared(objects):
        for obj in objects.values():
            value: list = [1] * 10
            for _ in range(4):
                value = [value] * 10  # 10**5 leaves from 50 list objects: below the load's own limit
            obj["args"].bomb = value

    monkeypatch.setattr(consistency, "_MAX_NODES", 10_000)
    with pytest.raises(CheckpointError, match="too large or too deeply nested"):
        _load(_folder(tmp_path, "b", tp=2, mutate=shared))
