"""Base or chat comes from the release's own name (its folder, the tarball's name), never from the path.

Before: ``chat`` anywhere in the path (``chat_experiments/8b_base_model_release.tar``) made a base model
"chat", and a tarball renamed ``tp1.tar`` holding ``8b_chat_model_release/`` was "unknown".
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hostile_inputs import fixture_members, tar_with

from persimmon_tools import ConvertOptions, convert, open_release
from persimmon_tools.synth.build import build_release, write_release_folder

PT = "iter_0001251/mp_rank_00/model_optim_rng.pt"


def _tar(releases, path: Path, top: str | None) -> Path:
    """The fixture release re-packed at ``path`` with top folder ``top`` (None: members at the root)."""
    members = []
    for info, data in fixture_members(releases["tar"]):
        rest = info.name.split("/", 1)[1] if "/" in info.name else ""
        if top is None and not rest:
            continue
        info = copy.copy(info)
        info.name = f"{top}/{rest}".rstrip("/") if top else rest
        members.append((info, data))
    path.parent.mkdir(parents=True, exist_ok=True)
    return tar_with(path, members)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("8b_chat_model_release", "chat"),
        ("8b_base_model_release.tar", "base"),
        ("Persimmon-8B-CHAT", "chat"),
        ("persimmon 8b base", "base"),
        ("chatty_release", None),
        ("8b_basement", None),
        ("tp1.tar", None),
        ("8b_chat_base_merge", "both"),
    ],
)
def test_a_name_says_chat_or_base_only_as_a_word(name, says):
    from persimmon_tools.megatron.variant import name_says

    assert name_says(name) == says


def test_witnesses_decide_or_give_unknown():
    from persimmon_tools.megatron.variant import decide_variant

    assert decide_variant([("folder x", "8b_chat_model_release"), ("tarball y", "tp1.tar")]) == (
        "chat",
        "folder x",
    )
    assert decide_variant([("a", "8b_chat_x"), ("b", "chat.tar")]) == ("chat", "a and b agree")
    variant, why = decide_variant([("a", "8b_chat_x"), ("b", "8b_base.tar")])
    assert variant == "unknown" and "conflicting" in why and "a says chat" in why and "b says base" in why
    assert decide_variant([])[0] == "unknown"
    assert decide_variant([("a", "release"), ("b", "r.tar")]) == (
        "unknown",
        "unknown: neither a nor b names base or chat",
    )


def test_chat_elsewhere_in_the_path_does_not_make_a_base_release_chat(releases, tmp_path):
    tar = _tar(releases, tmp_path / "chat_experiments" / "8b_base_model_release.tar", "8b_base_model_release")
    rel = open_release(tar)
    assert rel.variant == "base"
    assert rel.variant_from == (
        "release folder 8b_base_model_release inside 8b_base_model_release.tar and tarball name "
        "8b_base_model_release.tar agree"
    )
    out = tmp_path / "chat_out"
    convert(tar, out, ConvertOptions(), verify="off")  # the record is the point here, not the check
    record = json.loads((out / "conversion.json").read_text())
    assert (
        record["source"]["variant"] == "base" and "8b_base_model_release" in record["source"]["variant_from"]
    )


def test_renamed_tarball_is_decided_by_its_release_folder(releases, tmp_path):
    rel = open_release(_tar(releases, tmp_path / "tp1.tar", "8b_chat_model_release"))
    assert (rel.variant, rel.variant_from) == ("chat", "release folder 8b_chat_model_release inside tp1.tar")


def test_tarball_name_decides_when_the_folder_is_silent(releases, tmp_path):
    rel = open_release(_tar(releases, tmp_path / "8b_chat_model_release.tar", None))
    assert (rel.variant, rel.variant_from) == ("chat", "tarball name 8b_chat_model_release.tar")
    rel = open_release(_tar(releases, tmp_path / "x" / "8b_chat_model_release.tar", "tiny_release"))
    assert rel.variant == "chat"


def test_conflicting_or_missing_witnesses_give_unknown(releases, tmp_path):
    rel = open_release(_tar(releases, tmp_path / "8b_chat_model_release.tar", "8b_base_model_release"))
    assert rel.variant == "unknown" and "conflicting" in rel.variant_from
    rel = open_release(_tar(releases, tmp_path / "chat" / "base" / "tiny.tar", "tiny_release"))
    assert rel.variant == "unknown"
    assert (
        rel.variant_from
        == "unknown: neither release folder tiny_release inside tiny.tar nor tarball name tiny.tar names base or chat"
    )


def test_folder_iteration_and_pt_sources_use_the_release_folder(tmp_path, monkeypatch):
    folder = write_release_folder(build_release(seed=0), tmp_path / "chat_runs" / "8b_base_model_release")
    for source in (folder, folder / "iter_0001251", folder / PT):
        rel = open_release(source)
        assert rel.variant == "base", (source, rel.variant_from)
        assert "8b_base_model_release" in rel.variant_from
    monkeypatch.chdir(folder)
    assert open_release(Path(".")).variant == "base"
    plain = write_release_folder(build_release(seed=0), tmp_path / "chat" / "release")
    assert open_release(plain).variant == "unknown"
    assert (
        open_release(tmp_path / "chat").variant == "unknown"
    )  # the folder holding a release folder "release"
    assert open_release(plain / PT).variant == "unknown"


def test_a_lone_pt_outside_a_release_folder_is_unknown(tmp_path):
    folder = write_release_folder(build_release(seed=0), tmp_path / "8b_chat_model_release")
    (folder / "latest_checkpointed_iteration.txt").unlink()
    (folder / "adept_vocab.model").unlink()
    rel = open_release(
        folder / PT
    )  # the parent of iter_* holds neither tracker nor vocab: not a release root
    assert rel.variant == "unknown" and "not inside a release folder" in rel.variant_from
    assert open_release(folder).variant == "chat"  # the folder itself was named as SOURCE


@pytest.mark.parametrize(
    ("stored_as", "variant"),
    [("chat/8b_base_model_release", "base"), ("base/8b_chat_model_release", "chat")],
)
def test_verify_chooses_the_published_logits_by_the_releases_own_name(
    stored_as, variant, converted_tiny, tmp_path, monkeypatch
):
    """A base release kept in a folder named ``chat`` is not the chat model for verify's published-logits
    comparison (the path's words used to decide it); the chat release in a folder named ``base`` is."""
    import persimmon_tools.verification.verify as vv

    folder = write_release_folder(build_release(seed=0), tmp_path / stored_as)
    seen = []
    # the real rule also needs the 8B shapes; here only the variant verify hands it decides
    monkeypatch.setattr(vv, "is_8b_chat", lambda hp, iteration, v: seen.append(v) or v == "chat")
    monkeypatch.setattr(vv, "INPUT_IDS", tuple(range(1, 9)))  # ids inside the tiny vocabulary
    options = vv.VerifyOptions(write=False, loader="persimmon-tools", default_prompts=False, ids=((1, 2, 3),))
    report = vv.verify(converted_tiny, folder, options)
    assert seen == [variant] and report.source["variant"] == variant
    published = [m.name for m in report.metrics if m.name == "published"]
    assert bool(published) == (variant == "chat")
    assert (report.published_reference is not None) == (variant == "chat")
