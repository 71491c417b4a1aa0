"""Finding shards, iteration and vocabulary in every SOURCE layout."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.build import build_release, write_release_folder


def test_tar_is_read_in_place(releases, tmp_path):
    rel = open_release(releases["tar"])
    assert (rel.kind, rel.iteration, rel.tp, rel.pp) == ("tar", 1251, 1, 1)
    assert rel.vocab is not None and rel.vocab.name.endswith("adept_vocab.model")
    # read in place: the shard is a byte range of the tar itself, nothing was extracted
    src = rel.shards[(0, 0)]
    assert src.path == releases["tar"] and src.offset > 0
    assert list(tmp_path.iterdir()) == []


def test_folder_iteration_folder_and_pt(releases):
    folder = releases["folder"]
    rel = open_release(folder)
    assert (rel.kind, rel.iteration) == ("folder", 1251)
    it = open_release(folder / "iter_0001251")
    assert it.kind == "iteration" and it.vocab is not None and it.iteration == 1251
    pt = open_release(folder / "iter_0001251" / "mp_rank_00" / "model_optim_rng.pt")
    assert pt.kind == "pt" and pt.iteration == 1251 and pt.vocab is not None


def test_sharded_layouts(releases):
    assert (open_release(releases["tp2"]).tp, open_release(releases["tp2"]).pp) == (2, 1)
    rel = open_release(releases["tp2pp3"])
    assert (rel.tp, rel.pp, rel.pipeline_naming) == (2, 3, True)
    assert len(rel.shards) == 6


def test_tracker_chooses_iteration_and_ambiguity_lists_candidates(tmp_path):
    folder = write_release_folder(build_release(seed=0), tmp_path / "rel")
    shutil.copytree(folder / "iter_0001251", folder / "iter_0000500")
    assert open_release(folder).iteration == 1251  # the tracker decides
    (folder / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(ReleaseError) as err:
        open_release(folder)
    assert "iter_0000500" in err.value.message and "iter_0001251" in err.value.message
    assert "--iteration" in err.value.hint
    assert open_release(folder, iteration=500).iteration == 500


def test_bad_tracker_and_missing_iteration(tmp_path):
    folder = write_release_folder(build_release(seed=0), tmp_path / "rel")
    (folder / "latest_checkpointed_iteration.txt").write_text("999")
    with pytest.raises(ReleaseError, match="iteration 999 has no shards"):
        open_release(folder)
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(ReleaseError, match="should hold an iteration number"):
        open_release(folder)


def test_missing_shard_is_named(tmp_path):
    folder = write_release_folder(build_release(tp=2, pp=2, seed=0), tmp_path / "rel")
    shutil.rmtree(folder / "iter_0001251" / "mp_rank_01_001")
    with pytest.raises(ReleaseError) as err:
        open_release(folder)
    assert "mp_rank_01_001" in err.value.message and "TP=2 x PP=2" in err.value.message


def test_no_checkpoint_and_not_a_tar(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReleaseError, match="no checkpoint found"):
        open_release(tmp_path / "empty")
    bogus = tmp_path / "x.tar"
    bogus.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ReleaseError):
        open_release(bogus)


def test_variant_from_name(tmp_path, releases):
    chat = tmp_path / "8b_chat_model_release.tar"
    shutil.copy(releases["tar"], chat)
    assert open_release(chat).variant == "chat"
    assert open_release(releases["tar"]).variant == "unknown"


def test_truncated_tar_member_is_reported(tmp_path, releases):
    data = releases["tar"].read_bytes()
    with tarfile.open(releases["tar"]) as tf:
        member = next(m for m in tf if m.name.endswith(".pt"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: member.offset_data + member.size // 2])
    with pytest.raises(ReleaseError):
        open_release(cut)
