# ruff: noqa: F811  (the fixture outs comes from export_helpers, shared by the export tests)
"""Export refusals (issue 17, "Done when" 4 and 5): each names the problem and writes nothing (OUT absent,
no temporary or lock left beside it); ``--force`` replaces only an earlier export; the CLI's ``--json``,
``--dry-run`` and exit codes.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from export_helpers import flat, listing, outs, read_release, run  # noqa: F401 (outs: a fixture)
from safetensors.torch import load_file, save_file

from persimmon_tools.errors import ConversionError, MappingError, PersimmonToolsError, UsageError
from persimmon_tools.export.export import ExportOptions, export_release


def _refused(source, out, options, error=PersimmonToolsError, match=None):
    parent = out.parent
    before = listing(parent)
    with pytest.raises(error, match=match) as err:
        export_release(source, out, options)
    assert listing(parent) == before, "a refusal wrote something"
    return err.value


@pytest.fixture
def hf_copy(converted_tiny, tmp_path):
    """A writable copy of the converted tiny fixture (bf16, single model.safetensors)."""
    folder = tmp_path / "hf"
    shutil.copytree(converted_tiny, folder)
    return folder


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tp_that_does_not_divide_heads_or_ffn(converted_tiny, outs):
    err = _refused(converted_tiny, outs / "out", ExportOptions(tp=3), UsageError)
    assert "TP=3" in err.message and "4 attention heads" in err.message and "256" in err.message
    assert "1, 2, 4" in err.hint
    result = run("export", converted_tiny, outs / "out", "--tp", "3")
    assert result.exit_code == 2 and "TP=3" in result.stderr
    assert listing(outs) == []


def test_pp_that_does_not_divide_layers(converted_tiny, outs):
    err = _refused(converted_tiny, outs / "out.tar", ExportOptions(pp=4, tar=True), UsageError)
    assert "PP=4" in err.message and "6 layers" in err.message


def test_hf_folder_missing_a_weight(hf_copy, outs):
    _edit_weights(hf_copy, lambda t: t.pop("model.layers.3.mlp.dense_4h_to_h.bias"))
    err = _refused(hf_copy, outs / "out", ExportOptions(), MappingError)
    assert "missing: model.layers.3.mlp.dense_4h_to_h.bias" in err.message


def test_hf_folder_with_an_extra_tensor(hf_copy, outs):
    _edit_weights(
        hf_copy, lambda t: t.update({"model.extra.weight": t["model.final_layernorm.weight"].clone()})
    )
    err = _refused(hf_copy, outs / "out", ExportOptions(), MappingError)
    assert "model.extra.weight" in err.message and "not a Persimmon weight" in err.message


def test_hf_folder_with_a_layer_config_does_not_have(hf_copy, outs):
    config = json.loads((hf_copy / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (hf_copy / "config.json").write_text(json.dumps(config))
    err = _refused(hf_copy, outs / "out", ExportOptions(), MappingError)
    assert "model.layers.5." in err.message and "not expected by config.json" in err.message


def test_config_that_disagrees_with_a_shape(hf_copy, outs):
    config = json.loads((hf_copy / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_copy / "config.json").write_text(json.dumps(config))
    err = _refused(hf_copy, outs / "out", ExportOptions(), MappingError)
    assert "model.layers.0.mlp.dense_h_to_4h.weight: shape [256, 64], config.json implies [128, 64]" in (
        err.message
    )


def test_out_not_empty_without_force(converted_tiny, outs):
    out = outs / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = run("export", converted_tiny, out)
    assert result.exit_code == 1 and "not empty" in result.stderr and "--force" in result.stderr
    assert listing(outs) == ["out", "out/mine.txt"]
    # --force does not replace a folder that is not an earlier export
    result = run("export", converted_tiny, out, "--force")
    assert result.exit_code == 1 and "mine.txt" in result.stderr
    assert listing(outs) == ["out", "out/mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_force_replaces_an_earlier_export_only(converted_tiny, outs):
    out = outs / "out"
    export_release(converted_tiny, out, ExportOptions(tp=1))
    first = listing(out)
    assert run("export", converted_tiny, out).exit_code == 1
    assert listing(out) == first
    result = run("export", converted_tiny, out, "--force", "--tp", "2", "--json")
    assert result.exit_code == 0, result.output
    _, shards, _ = read_release(out)
    assert sorted(shards) == [f"iter_0001251/mp_rank_0{t}/model_optim_rng.pt" for t in (0, 1)]
    assert listing(outs) == ["out", *(f"out/{p}" for p in listing(out))]  # no temporary or old copy left
    record = json.loads((out / "export.json").read_text())
    assert sorted(record["output_files"]) == sorted(p for p in listing(out) if (out / p).is_file())
    # a file of someone else's in the earlier export: --force refuses and keeps everything
    (out / "tiny_release" / "notes.txt").write_text("mine")
    before = listing(outs)
    result = run("export", converted_tiny, out, "--force")
    assert result.exit_code == 1 and "notes.txt" in result.stderr
    assert listing(outs) == before and (out / "tiny_release" / "notes.txt").read_text() == "mine"


def test_tar_onto_an_existing_file(converted_tiny, outs):
    out = outs / "out.tar"
    out.write_bytes(b"not yours")
    result = run("export", converted_tiny, out, "--tar")
    assert result.exit_code == 1 and "exists" in result.stderr
    assert out.read_bytes() == b"not yours" and listing(outs) == ["out.tar"]
    # --force replaces only a tarball persimmon-tools wrote (it carries the toolkit's record), not this file
    result = run("export", converted_tiny, out, "--tar", "--force")
    assert result.exit_code == 1 and f"OUT {out} exists and is not a tarball persimmon-tools wrote" in (
        result.stderr
    )
    assert f"remove {out} yourself or choose another name" in result.stderr
    assert out.read_bytes() == b"not yours" and listing(outs) == ["out.tar"]
    out.unlink()
    assert run("export", converted_tiny, out, "--tar", "--tp", "2").exit_code == 0
    result = run("export", converted_tiny, out, "--tar", "--force")
    assert result.exit_code == 0, result.output
    name, shards, _ = read_release(out)
    assert name == "tiny_release" and len(shards) == 1 and listing(outs) == ["out.tar"]
    # --tar onto a folder is refused even with --force
    folder = outs / "folder.tar"
    folder.mkdir()
    assert run("export", converted_tiny, folder, "--tar", "--force").exit_code == 1
    assert listing(outs) == ["folder.tar", "out.tar"]


def test_out_inside_source_is_refused(hf_copy):
    before = listing(hf_copy)
    for out in (hf_copy / "release", hf_copy / "sub" / "release.tar", hf_copy, hf_copy.parent):
        tar = out.suffix == ".tar"
        with pytest.raises(UsageError, match="SOURCE"):
            export_release(hf_copy, out, ExportOptions(tar=tar))
        assert listing(hf_copy) == before
    result = run("export", hf_copy, hf_copy / "release")
    assert result.exit_code == 2 and listing(hf_copy) == before


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_out_a_symlink_is_refused(tar, converted_tiny, outs, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = outs / ("out.tar" if tar else "out")
    link.symlink_to(target / ("x.tar" if tar else ""), target_is_directory=not tar)
    for force in (False, True):
        with pytest.raises(ConversionError, match="symbolic link"):
            export_release(converted_tiny, link, ExportOptions(tar=tar, force=force))
        assert listing(outs) == [link.name] and os.path.islink(link)
        assert listing(target) == []


def test_unknown_dtype_and_bad_set(converted_tiny, outs):
    _refused(converted_tiny, outs / "o", ExportOptions(dtype="fp8"), UsageError, "--dtype")
    _refused(converted_tiny, outs / "o", ExportOptions(sets=("no_equals",)), UsageError, "KEY=VALUE")
    _refused(converted_tiny, outs / "o", ExportOptions(name="../x"), UsageError, "--name")
    assert run("export", converted_tiny, outs / "o", "--dtype", "fp8").exit_code == 2
    assert listing(outs) == []


def test_json_summary_is_one_object(converted_tiny, outs):
    out = outs / "out.tar"
    result = run("export", converted_tiny, out, "--tp", "2", "--pp", "3", "--tar", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # exactly one JSON document
    assert summary["out"] == str(out) and summary["tar"] is True
    assert (summary["tp"], summary["pp"], summary["iteration"], summary["dtype"]) == (2, 3, 1251, "bfloat16")
    assert summary["source_kind"] == "hf" and summary["args_from"] == "conversion.json"
    assert len(summary["shards"]) == 6 and summary["peak_rss_bytes"] > 0
    _, shards, _ = read_release(out)
    payload = sum(t.nbytes for obj in shards.values() for t in flat(obj["model"]).values())
    assert summary["bytes_written"] == payload  # tensor bytes (the progress count), not the tar's size
    assert summary["name"] == "tiny_release"


def test_dry_run_prints_the_plan_and_writes_nothing(converted_tiny, outs):
    out = outs / "out"
    result = run("export", converted_tiny, out, "--tp", "4", "--pp", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.stdout
    assert "TP=4 PP=2" in result.stdout and "args from conversion.json" in result.stdout
    assert "tiny_release/iter_0001251/mp_rank_03_001/model_optim_rng.pt" in result.stdout
    assert listing(outs) == []
    as_json = run("export", converted_tiny, out, "--dry-run", "--json", "--dtype", "fp32")
    assert as_json.exit_code == 0
    plan = json.loads(as_json.stdout)
    assert plan["dtype"] == "float32"
    assert {d["field"] for d in plan["derived_args"]} == {"bf16", "params_dtype"}
    assert listing(outs) == []


def test_inspect_reads_the_result(converted_tiny, outs):
    out = outs / "out"
    assert run("export", converted_tiny, out, "--pp", "2", "-q").exit_code == 0
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["tp"], info["pp"], info["iteration"]) == (1, 2, 1251)


def test_megatron_source_iteration_and_failure_json(releases, outs):
    """A Megatron source (the tiny tar) and a failure with --json: one error object, exit 2."""
    result = run("export", releases["tp2pp3"], outs / "o", "--tp", "3", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "TP=3" in error["message"] and error["exit_code"] == 2
    result = run("export", releases["tp2pp3"], outs / "o", "--source-iteration", "1251", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["source_kind"] == "megatron" and summary["source_layout"] == {"tp": 2, "pp": 3}


def test_out_under_a_link_to_source_is_refused(hf_copy, outs):
    (outs / "link").symlink_to(hf_copy, target_is_directory=True)
    before = listing(hf_copy)
    for out, tar in ((outs / "link" / "release", False), (outs / "link" / "release.tar", True)):
        with pytest.raises(UsageError, match="SOURCE"):
            export_release(hf_copy, out, ExportOptions(tar=tar))
    with pytest.raises(UsageError, match="SOURCE"):  # SOURCE spelled through the link
        export_release(outs / "link", hf_copy / "release", ExportOptions())
    assert listing(hf_copy) == before and listing(outs) == ["link"]


def test_tar_into_a_new_folder(converted_tiny, outs):
    out = outs / "new" / "dir" / "release.tar"
    export_release(converted_tiny, out, ExportOptions(tar=True))
    assert read_release(out)[0] == "tiny_release"
    assert listing(outs) == ["new", "new/dir", "new/dir/release.tar"]


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_failure_while_writing_leaves_nothing(tar, hf_copy, outs):
    """A value fp16 cannot hold, in the last tensor written: the error comes mid-write; nothing remains."""

    def huge(t):
        t["lm_head.weight"][-1, -1] = 1e38

    _edit_weights(hf_copy, huge)
    out = outs / ("out.tar" if tar else "out")
    err = _refused(hf_copy, out, ExportOptions(dtype="fp16", tp=2, pp=2, tar=tar), ConversionError)
    assert "word_embeddings_for_head.weight" in err.message and "overflow" in err.message
    assert listing(outs) == []
