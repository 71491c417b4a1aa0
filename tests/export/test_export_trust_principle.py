# ruff: noqa: F811  (the fixtures hf and outs come from export_helpers, shared by the export tests)
"""The principle of issue 22, part C: a release that export writes is one that convert accepts, and the
reverse.

- Export reads its release back as convert reads one (``convert.prepare``) before installing it: a release
  convert would refuse, or one that converts to another model than the source, is never installed.
- Every up-front refusal of export, switched off, gives a release that convert refuses (or that converts to
  another model), and the read-back refuses it in its place.
- Convert's refusals of a broken Megatron release are export's refusals of it as SOURCE (same error, and the
  same message where both come from the shared reader).

Also: the help names ``torch.load(path, weights_only=False)`` (torch, the oracle, refuses the shards with its
default), and a failing export leaves no folder it created.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile

import pytest
import torch
from export_helpers import (  # noqa: F401 (outs, hf: fixtures)
    EMBED,
    HEAD,
    copy_folder,
    drop_head,
    edit_config,
    edit_weights,
    hf,
    megatron_release,
    outs,
    refused,
    run,
    spec_of,
)

from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.conversion.convert import prepare as convert_prepare
from persimmon_tools.errors import CheckpointError, ConfigError, ConversionError, UsageError
from persimmon_tools.export.export import ExportOptions, export_release

# ---- 6. the principle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_read_back_refuses_what_convert_would_refuse(tar, converted_tiny, outs, monkeypatch):
    """A release convert would refuse (here: args that contradict the shapes) is never installed."""
    import persimmon_tools.export.export as export_module

    real = export_module.shard_objects

    def damaged(*args, **kwargs):
        objects = real(*args, **kwargs)
        for obj in objects.values():
            obj["args"].hidden_size = 999
        return objects

    monkeypatch.setattr(export_module, "shard_objects", damaged)
    err = refused(converted_tiny, outs, ExportOptions(tar=tar, tp=2), ConversionError)
    assert "convert would refuse the release" in err.message and "args.hidden_size = 999" in err.message


def _set(item):
    def setup(folder):
        return (item,)

    return setup


def _config(**changes):
    def setup(folder):
        edit_config(folder, **changes)
        return ()

    return setup


def _tied(folder):
    drop_head(folder)
    return ()


def _small_vocab(folder):
    edit_weights(folder, lambda t: t.update({n: t[n][:512].clone() for n in (EMBED, HEAD)}))
    edit_config(folder, vocab_size=512)
    (folder / "conversion.json").unlink()
    return ()


def _old_version(folder):
    record = json.loads((folder / "conversion.json").read_text())
    (folder / "conversion.json").write_text(json.dumps(record | {"checkpoint_version": 1.0}))
    return ()


_ARGS = [("persimmon_tools.export.derive.check_args", lambda *a: None)]
_VALUES = [*_ARGS, ("persimmon_tools.export.derive.VALUE_RULES", {})]
#: case -> (set up the HF folder -> --set items, export's up-front check to switch off, what convert says of
#: the release written without it: (error, phrase), or None when convert accepts it but it is another model)
EXPORT_REFUSALS = {
    "set num_layers=5": (_set("num_layers=5"), _ARGS, (ConfigError, "args.num_layers = 5")),
    "set rotary_emb_base=-1": (
        _set("rotary_emb_base=-1"),
        _VALUES,
        (ConfigError, "args.rotary_emb_base = -1"),
    ),
    "set untie_embeddings=False": (
        _set("untie_embeddings=False"),
        _ARGS,
        (ConfigError, "args.untie_embeddings = False"),
    ),
    "set rotary_emb_base=10000": (_set("rotary_emb_base=10000"), _ARGS, None),
    "config rope_theta edited": (_config(rope_theta=10000.0), _ARGS, None),
    "config layer_norm_eps edited": (_config(layer_norm_eps=1e-6), _ARGS, None),
    "config head removed, tied": (_tied, _ARGS, (ConfigError, "args.untie_embeddings = True")),
    "more pieces than rows": (
        _small_vocab,
        [("persimmon_tools.export.export.check_vocab", lambda src: None)],
        (ConversionError, "600 pieces but the checkpoint's embedding has only 512 rows"),
    ),
    "checkpoint_version 1.0": (
        _old_version,
        [("persimmon_tools.export.export.check_checkpoint_version", lambda *a: None)],
        (CheckpointError, "checkpoint_version is 1.0"),
    ),
}


@pytest.mark.parametrize("case", sorted(EXPORT_REFUSALS))
def test_export_refusals_are_convert_refusals(case, hf, outs, monkeypatch):
    """Each refusal of export, switched off, gives a release that convert refuses (or that converts to
    another model than the source); export's read-back then refuses it in its place."""
    setup, checks, by_convert = EXPORT_REFUSALS[case]
    options = ExportOptions(sets=setup(hf))
    first = refused(hf, outs, options)  # 1. export refuses it up front
    assert not first.message.startswith("convert would refuse")
    for target, replacement in checks:  # 2. without that check, the read-back refuses it
        monkeypatch.setattr(target, replacement)
    err = refused(hf, outs, options, ConversionError)
    if by_convert is None:
        assert "converts to another model than the source" in err.message, err.message
    else:
        assert "convert would refuse" in err.message and by_convert[1] in err.message, err.message
    # 3. without the read-back, the release is written, and convert refuses it (or reads another model)
    monkeypatch.setattr("persimmon_tools.export.export.read_back", lambda *a: 0.0)
    export_release(hf, outs / "written", options)
    release = next(p for p in (outs / "written").iterdir() if p.is_dir())
    if by_convert is None:
        source = json.loads((hf / "config.json").read_text())
        config = convert_prepare(release, ConvertOptions()).config
        assert [config[k] for k in ("rope_theta", "layer_norm_eps")] != [
            source[k] for k in ("rope_theta", "layer_norm_eps")
        ]
    else:
        with pytest.raises(by_convert[0], match=by_convert[1]):
            convert_prepare(release, ConvertOptions())


def _args(**fields):
    def edit(objects):
        for obj in objects.values():
            for k, v in fields.items():
                setattr(obj["args"], k, v)

    return edit


def _version(objects):
    for obj in objects.values():
        obj["checkpoint_version"] = 1.0


def _iteration(objects):
    objects[(1, 0)]["iteration"] += 1


def _shrink_vocab(objects):
    for obj in objects.values():
        obj["args"].padded_vocab_size = 512
        model = obj["model"]
        model["language_model"]["embedding"]["word_embeddings"]["weight"] = spec_of(torch.zeros(512, 64))
        model["word_embeddings_for_head"]["weight"] = spec_of(torch.zeros(512, 64))
        model["language_model"]["encoder"] = {
            k: (spec_of(torch.zeros(v.shape)) if "inv_freq" not in k else v)
            for k, v in model["language_model"]["encoder"].items()
        }


def _nan(objects):
    for obj in objects.values():
        obj["model"]["language_model"]["encoder"]["final_layernorm.weight"] = spec_of(
            torch.full((64,), float("nan"), dtype=torch.bfloat16)
        )


#: broken Megatron releases: name -> (edit of the per-rank objects, TP, the error both must raise)
CONVERT_REFUSALS = {
    "rotary base vs inv_freq": (_args(rotary_emb_base=10000.0), 1, ConfigError),
    "args vs shapes": (_args(num_layers=5), 1, ConfigError),
    "post-LN residual": (_args(apply_residual_connection_post_layernorm=True), 1, ConfigError),
    "checkpoint_version 1.0": (_version, 1, CheckpointError),
    "shards of two iterations": (_iteration, 2, CheckpointError),
    "more pieces than rows": (_shrink_vocab, 1, ConversionError),
    "NaN weights": (_nan, 1, ConversionError),
}


@pytest.mark.parametrize("case", sorted(CONVERT_REFUSALS))
def test_convert_refusals_are_export_refusals(case, tmp_path, outs):
    """A broken Megatron release that convert refuses is refused by export as its SOURCE, the same way."""
    edit, tp, error = CONVERT_REFUSALS[case]
    release = megatron_release(tmp_path / "release", edit, tp=tp)
    with pytest.raises(error) as by_convert:
        convert(release, tmp_path / "hf", ConvertOptions())
    by_export = refused(release, outs, ExportOptions(), error)
    if case == "NaN weights":  # convert lists HF names, export Megatron names
        assert "NaN/Inf values in 1 tensor(s)" in by_convert.value.message
        assert "NaN/Inf values in 1 tensor(s)" in by_export.message
    else:
        assert by_export.message == by_convert.value.message


# ---- 7. help; 8. no folder left behind -----------------------------------------------------------------


def test_help_names_weights_only_false(tmp_path, converted_tiny):
    text = " ".join(run("export", "--help").output.split())
    assert "torch.load(path, weights_only=False)" in text and "plain torch.load works" not in text
    assert "add_safe_globals" in text
    out = tmp_path / "o.tar"
    export_release(converted_tiny, out, ExportOptions(tar=True))
    with tarfile.open(out) as tf:
        data = next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".pt"))
    with pytest.raises(Exception, match="weights_only"):
        torch.load(io.BytesIO(data))  # torch's default refuses the pickle ...
    with torch.serialization.safe_globals([argparse.Namespace]):  # ... and loads it with the allowlist
        obj = torch.load(io.BytesIO(data), weights_only=True)
    assert set(obj) == {"args", "checkpoint_version", "iteration", "model"}


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_failures_leave_no_parent_folders(tar, hf, outs, monkeypatch):
    deep = ExportOptions(tar=tar, tp=2)
    edit_weights(hf, lambda t: t["model.final_layernorm.weight"].__setitem__(0, float("nan")))
    refused(hf, outs, deep, ConversionError, "NaN/Inf")  # while writing (outs/new/... created, then removed)
    monkeypatch.setattr("persimmon_tools.export.export.refuse_nonfinite", lambda *a: None)
    monkeypatch.setattr("persimmon_tools.export.checks.convert_prepare", _raise)
    refused(hf, outs, deep, ConversionError, "convert would refuse")  # at the read-back
    refused(hf, outs, ExportOptions(tar=tar, sets=("num_layers=5",)), UsageError)  # before writing


def _raise(*args, **kwargs):
    raise ConfigError("refused on purpose")
