"""An ``mp_rank_XX`` (``mp_rank_XX_YYY``) folder as SOURCE (issue 23, part F, item 2).

It is read as its ``model_optim_rng.pt`` would be (TP=1, PP=1, the iteration from ``iter_*`` above, the
vocabulary from the release folder); one rank of a sharded release is refused, naming the ``iter_*`` folder
to give instead. ``inspect`` and ``convert`` run in-process (``CliRunner``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.synth.build import build_release, write_release_folder

IT = "iter_0001251"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rank-folders")
    out = {"tp1": write_release_folder(build_release(seed=0), base / "tiny_release")}
    for name, tp, pp in (("tp2", 2, 1), ("tp2pp3", 2, 3)):
        out[name] = write_release_folder(build_release(seed=0, tp=tp, pp=pp), base / f"{name}_release")
    return out


def _inspect(source: Path) -> dict:
    result = cli("inspect", source, "--json", "--no-tensors")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_reads_a_rank_folder_as_its_pt_file(folders):
    rank = folders["tp1"] / IT / "mp_rank_00"
    info, as_pt = _inspect(rank), _inspect(rank / "model_optim_rng.pt")
    assert (info["kind"], info["tp"], info["pp"], info["iteration"]) == ("pt", 1, 1, 1251)
    assert info["vocab"] == str(folders["tp1"] / "adept_vocab.model")
    assert info["source"] == str(rank)
    assert {k: v for k, v in info.items() if k != "source"} == {
        k: v for k, v in as_pt.items() if k != "source"
    }


def test_convert_a_rank_folder_equals_converting_its_pt_file(folders, tmp_path):
    rank = folders["tp1"] / IT / "mp_rank_00"
    for name, source in (("from_folder", rank), ("from_pt", rank / "model_optim_rng.pt")):
        result = cli("convert", source, tmp_path / name, "--no-verify", "-q")
        assert result.exit_code == 0, result.output
    a, b = tmp_path / "from_folder", tmp_path / "from_pt"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    record = json.loads((a / "conversion.json").read_text())["source"]
    assert (record["kind"], record["name"], record["iteration"]) == ("pt", "mp_rank_00", 1251)
    assert record["checkpoint_files"][0]["name"] == "model_optim_rng.pt"


def test_a_pipeline_named_single_rank_folder_converts(folders, tmp_path):
    """``mp_rank_00_000`` with no sibling: a whole checkpoint in pipeline naming."""
    release = tmp_path / "rel"
    shutil.copytree(folders["tp1"], release)
    (release / IT / "mp_rank_00").rename(release / IT / "mp_rank_00_000")
    result = cli("convert", release / IT / "mp_rank_00_000", tmp_path / "hf", "--no-verify", "-q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("layout", "rank", "sibling"),
    [
        ("tp2", "mp_rank_00", "mp_rank_01"),
        ("tp2", "mp_rank_01", "mp_rank_00"),
        ("tp2pp3", "mp_rank_01_002", "mp_rank_00_000"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_one_rank_of_a_sharded_release_is_refused(folders, tmp_path, layout, rank, sibling, command):
    source = folders[layout] / IT / rank
    args = [source] if command == "inspect" else [source, tmp_path / "hf", "--no-verify"]
    result = cli(command, *args)
    assert result.exit_code == 1, result.output
    assert f"{source} is one rank of a sharded checkpoint" in result.stderr
    assert sibling in result.stderr and "TP=1, PP=1" in result.stderr
    assert f"Hint: give the iter_* folder ({folders[layout] / IT})" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_a_lone_copy_of_one_rank_is_refused_by_its_args_or_its_number(folders, tmp_path):
    lone = tmp_path / "copied" / "mp_rank_00"  # no siblings, but the args say TP=2
    shutil.copytree(folders["tp2"] / IT / "mp_rank_00", lone)
    result = cli("convert", lone, tmp_path / "hf", "--no-verify")
    assert result.exit_code == 1 and "args.tensor_model_parallel_size = 2" in result.stderr
    assert "every mp_rank_* folder of that iteration" in result.stderr  # not an iter_* folder above it
    other = tmp_path / "other" / "mp_rank_01"  # rank 1 on its own cannot be a whole checkpoint
    shutil.copytree(folders["tp1"] / IT / "mp_rank_00", other)
    result = cli("inspect", other)
    assert result.exit_code == 1 and "it is rank (1, 0)" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_a_release_folder_named_like_a_rank_is_still_a_release_folder(folders, tmp_path):
    """No shard file directly inside: the folder is searched as a release folder, as before."""
    odd = tmp_path / "mp_rank_00"
    shutil.copytree(folders["tp1"], odd)
    info = _inspect(odd)
    assert (info["kind"], info["tp"], info["iteration"]) == ("folder", 1, 1251)
