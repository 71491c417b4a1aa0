# ruff: noqa: F811  (the fixtures hf and outs come from export_helpers, shared by the export tests)
"""Export trusts nothing that convert would refuse (issue 22, part C). The principle, "a release that export
writes is one that convert accepts, and the reverse", is proved in test_export_trust_principle.py; here:

1. safetensors headers are read as strictly as the ``safetensors`` library reads them (the library is the
   oracle: ``safe_open`` refuses every file export refuses here);
2. a folder holding ``model.safetensors`` and an index is ambiguous (transformers, the oracle, loads the
   single file) and is refused; an index must describe its shards;
3. ``config.json`` edited after conversion is never silently overruled by ``conversion.json``'s args;
4. a vocabulary with more pieces than embedding rows, and NaN/Inf weights, are refused;
5. every ``--set`` is checked up front (UsageError naming the flag and the key).

Every refusal is made into ``outs/new/out``: nothing may be left behind, not even the parent folders.
"""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import (  # noqa: F401 (outs, hf: fixtures)
    EMBED,
    HEAD,
    by_offset,
    copy_folder,
    drop_head,
    edit_config,
    edit_weights,
    hf,
    listing,
    outs,
    read_release,
    refused,
    run,
    safetensors_parts,
    write_safetensors_raw,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.conversion.safetensors_read import SafetensorsFolder
from persimmon_tools.errors import CheckpointError, ConfigError, ConversionError, UsageError
from persimmon_tools.export.export import ExportOptions, export_release

# ---- 1. safetensors headers, with the safetensors library as the oracle --------------------------------


def _overlap(header, data):
    second = by_offset(header)[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 2, end - 2]
    return header, data, second, "overlap"


def _gap(header, data):
    names = by_offset(header)
    at = header[names[1]]["data_offsets"][0]
    for name in names[1:]:
        header[name]["data_offsets"] = [v + 2 for v in header[name]["data_offsets"]]
    return header, data[:at] + b"\0\0" + data[at:], names[1], "gap"


def _short(header, data):
    names = by_offset(header)
    victim = names[len(names) // 2]
    cut = header[victim]["data_offsets"][1] - 2
    header[victim]["data_offsets"][1] -= 2
    for name in names[len(names) // 2 + 1 :]:
        header[name]["data_offsets"] = [v - 2 for v in header[name]["data_offsets"]]
    return header, data[:cut] + data[cut + 2 :], victim, "needs"


def _twice(header, data):
    """The first tensor named again, pointing at the second tensor's bytes: the library keeps the last one,
    the first tensor's bytes are then described by nothing."""
    first, second = by_offset(header)[:2]
    text = json.dumps(header)[:-1] + f', "{first}": ' + json.dumps(header[second]) + "}"
    return text.encode(), data, first, "twice"


def _uncovered(header, data):
    return header, data + b"\0" * 8, None, "no tensor describes"


def _truncated(header, data):
    return header, data[:-2], None, "the file is shorter"


BROKEN_HEADERS = {
    "overlapping ranges": _overlap,
    "gap between ranges": _gap,
    "range shorter than the tensor": _short,
    "a tensor named twice": _twice,
    "bytes no tensor describes": _uncovered,
    "data cut short": _truncated,
}


def _rewrite(folder, breaker):
    path = folder / "model.safetensors"
    header, data = safetensors_parts(path)
    new_header, new_data, tensor, phrase = breaker(header, data)
    write_safetensors_raw(path, new_header, new_data)
    return path, tensor, phrase


@pytest.mark.parametrize("case", sorted(BROKEN_HEADERS))
def test_broken_headers_are_refused_like_the_safetensors_library(case, hf, outs):
    path, tensor, phrase = _rewrite(hf, BROKEN_HEADERS[case])
    oracle = pytest.raises(Exception, match="(?i)offset|invalid|incomplete|metadata")
    with oracle, safe_open(path, framework="pt") as f:
        [f.get_tensor(k) for k in f.keys()]
    err = refused(hf, outs, error=ConversionError)
    assert str(path) in err.message and phrase in err.message, err.message
    if tensor is not None:
        assert tensor in err.message
    assert "Traceback" not in run("export", hf, outs / "o").output and listing(outs) == []


def test_header_size_past_the_file_is_refused(hf, outs):
    path = hf / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = (len(raw)).to_bytes(8, "little")  # the header would run past the end of the file
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="(?i)header"):
        safe_open(path, framework="pt")
    err = refused(hf, outs, error=ConversionError, match="the safetensors header claims")
    assert str(path) in err.message


def test_the_reader_accepts_what_the_library_accepts(hf, tmp_path):
    """Reordered header, zero-size tensor at a shared offset, __metadata__: valid for both."""
    header, data = safetensors_parts(hf / "model.safetensors")
    reordered = dict(reversed(list(header.items())))
    reordered["empty"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}
    reordered["__metadata__"] = {"format": "pt"}
    path = tmp_path / "model.safetensors"
    write_safetensors_raw(path, reordered, data)
    with safe_open(path, framework="pt") as f:
        oracle = {k: f.get_tensor(k) for k in f.keys()}
    ours = SafetensorsFolder(tmp_path, ConversionError)
    assert sorted(ours.entries) == sorted(oracle)
    for name, tensor in oracle.items():
        assert torch.equal(ours.read(name), tensor), name


# ---- 2. one unambiguous set of weight files ------------------------------------------------------------


def _shard(folder, scale=1.0):
    """Split model.safetensors into two shards + index (values scaled by ``scale``)."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in half.items():
        save_file({n: tensors[n] * scale for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_single_file_and_index_together_are_refused(hf, outs):
    _shard(hf, scale=2.0)  # model.safetensors stays: which set is the model?
    err = refused(hf, outs, error=ConversionError)
    assert "model.safetensors" in err.message and "model.safetensors.index.json" in err.message
    assert "transformers loads model.safetensors" in err.message and "remove" in err.hint


def test_transformers_loads_the_single_file_when_both_are_there(hf):
    """The oracle behind the refusal: transformers takes model.safetensors and never reads the index."""
    transformers = pytest.importorskip("transformers")
    single = load_file(hf / "model.safetensors")
    _shard(hf, scale=2.0)
    model = transformers.PersimmonForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    assert torch.equal(model.state_dict()[EMBED], single[EMBED])


def test_index_that_does_not_describe_its_shards(hf, outs):
    weight_map = _shard(hf)
    (hf / "model.safetensors").unlink()
    assert export_release(hf, outs / "ok", ExportOptions()).plan.source.kind == "hf"  # sharded is fine
    wrong = dict(
        weight_map,
        **{
            EMBED: "model-00002-of-00002.safetensors"
            if weight_map[EMBED].startswith("model-00001")
            else "model-00001-of-00002.safetensors"
        },
    )
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
    outs2 = outs / "x"
    outs2.mkdir()
    err = refused(hf, outs2, error=ConversionError, match="does not describe its shards")
    assert EMBED in err.message
    # one tensor in both shards
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    other = next(f for f in set(weight_map.values()) if f != weight_map[EMBED])
    tensors = load_file(hf / other)
    tensors[EMBED] = load_file(hf / weight_map[EMBED])[EMBED]
    save_file(tensors, hf / other)
    err = refused(hf, outs2, error=ConversionError, match="is in two shards")
    assert EMBED in err.message


def test_config_naming_other_weights_is_refused(hf, outs):
    edit_config(hf, transformers_weights="other.safetensors")
    err = refused(hf, outs, error=ConfigError, match="transformers_weights")
    assert "other.safetensors" in err.message


# ---- 3. config.json edited after conversion ------------------------------------------------------------


def _drop_layer(folder):
    edit_weights(folder, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.5.")])
    edit_config(folder, num_hidden_layers=5)


CONFIG_EDITS = {
    "rope_theta": (lambda f: edit_config(f, rope_theta=10000.0), "rope_theta = 10000.0", "rotary_emb_base"),
    "layer_norm_eps": (
        lambda f: edit_config(f, layer_norm_eps=1e-6),
        "layer_norm_eps = 1e-06",
        "layernorm_epsilon",
    ),
    "tied head": (drop_head, "tie_word_embeddings = True", "untie_embeddings"),
    "a layer removed": (_drop_layer, "num_hidden_layers = 5", "num_layers"),
    "hidden_act": (lambda f: edit_config(f, hidden_act="gelu"), "hidden_act = 'gelu'", "sq_relu"),
    "partial_rotary_factor": (
        lambda f: edit_config(f, partial_rotary_factor=0.25),
        "partial_rotary_factor = 0.25",
        "rotary_pct",
    ),
    "max_position_embeddings": (
        lambda f: edit_config(f, max_position_embeddings=4096),
        "max_position_embeddings = 4096",
        "max_position_embeddings",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_config_edits_are_never_silently_overruled(case, hf, outs):
    edit, says, field = CONFIG_EDITS[case]
    edit(hf)
    err = refused(hf, outs, error=ConfigError)
    assert f"config.json {says} but conversion.json records args.{field} = " in err.message, err.message
    assert "--set" in err.message and "restore config.json" in err.hint
    result = run("export", hf, outs / "o")
    assert result.exit_code == 1 and "config.json" in result.stderr and listing(outs) == []


def test_set_exports_what_config_json_says(hf, outs, tmp_path):
    edit_config(hf, rope_theta=10000.0)
    out = outs / "out"
    export_release(hf, out, ExportOptions(sets=("rotary_emb_base=10000",)))
    back = tmp_path / "back"
    convert(out / "tiny_release", back, ConvertOptions(tokenizer=False))
    assert json.loads((back / "config.json").read_text())["rope_theta"] == 10000.0


def test_recorded_args_lacking_a_fact_get_config_json_value(hf, outs, tmp_path):
    """Recorded args without rotary_emb_base: convert would assume ADEPT's 25000; config.json says 10000."""
    edit_config(hf, rope_theta=10000.0)
    record = json.loads((hf / "conversion.json").read_text())
    del record["args"]["rotary_emb_base"]
    (hf / "conversion.json").write_text(json.dumps(record))
    plan = export_release(hf, outs / "out", ExportOptions()).plan
    assert ("rotary_emb_base", 10000, "config.json rope_theta = 10000.0 (the recorded args lack it)") in (
        plan.derived
    )
    back = tmp_path / "back"
    convert(outs / "out" / "tiny_release", back, ConvertOptions(tokenizer=False))
    assert json.loads((back / "config.json").read_text())["rope_theta"] == 10000.0


@pytest.mark.parametrize("version", [1.0, "3.0", True])
def test_recorded_checkpoint_version_is_checked(version, hf, outs):
    record = json.loads((hf / "conversion.json").read_text())
    record["checkpoint_version"] = version
    (hf / "conversion.json").write_text(json.dumps(record))
    err = refused(hf, outs, error=CheckpointError, match="checkpoint_version")
    assert "conversion.json" in err.message


# ---- 4. vocabulary and values --------------------------------------------------------------------------


def test_more_pieces_than_rows_is_refused(hf, outs):
    edit_weights(hf, lambda t: t.update({n: t[n][:512].clone() for n in (EMBED, HEAD)}))
    edit_config(hf, vocab_size=512)
    err = refused(
        hf, outs, error=ConversionError, match="600 pieces but the checkpoint's embedding has only 512"
    )
    assert "tokenizer.model" in err.message


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar"])
def test_nonfinite_weights_are_refused_unless_allowed(tar, hf, outs, tmp_path):
    def poison(t):
        t["model.layers.2.mlp.dense_4h_to_h.weight"][3, :5] = float("nan")
        t["model.final_layernorm.weight"][0] = float("inf")

    edit_weights(hf, poison)
    err = refused(hf, outs, ExportOptions(tp=2, pp=2, tar=tar), ConversionError, "NaN/Inf")
    assert "language_model.encoder.layers.2.mlp.dense_4h_to_h.weight: 5" in err.message
    assert "language_model.encoder.final_layernorm.weight: 1" in err.message  # replicated: counted once
    assert "--allow-nonfinite" in err.hint
    result = run("export", hf, outs / "o", "--tp", "2", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    with pytest.raises(ConversionError, match="NaN/Inf"):  # convert refuses it the same way
        convert(outs / "o" / "tiny_release", tmp_path / "back", ConvertOptions(tokenizer=False))
    convert(
        outs / "o" / "tiny_release", tmp_path / "back", ConvertOptions(tokenizer=False, allow_nonfinite=True)
    )


# ---- 5. --set ------------------------------------------------------------------------------------------

BAD_SETS = [
    ("rotary_emb_base=abc", "rotary_emb_base"),
    ("rotary_emb_base=-1", "rotary_emb_base"),
    ("rotary_emb_base=0", "rotary_emb_base"),
    ("layernorm_epsilon=nan", "layernorm_epsilon"),
    ("num_layers=5", "num_layers"),
    ("num_layers=six", "num_layers"),
    ("hidden_size=10**30", "hidden_size"),
    ("hidden_size=1000000000000", "hidden_size"),
    ("seq_length=0", "seq_length"),
    ("seq_length=2.5", "seq_length"),
    ("make_vocab_size_divisible_by=-1", "make_vocab_size_divisible_by"),
    ("make_vocab_size_divisible_by=0", "make_vocab_size_divisible_by"),
    ("rotary_pct=2", "rotary_pct"),
    ("untie_embeddings=False", "untie_embeddings"),
    ("untie_embeddings=1", "untie_embeddings"),
    ("pos_emb=alibi", "pos_emb"),
    ("apply_residual_connection_post_layernorm=True", "apply_residual_connection_post_layernorm"),
    ("tensor_model_parallel_size=2", "tensor_model_parallel_size"),
    ("padded_vocab_size=512", "padded_vocab_size"),
    ("params_dtype=float32", "params_dtype"),
]


@pytest.mark.parametrize(("item", "key"), BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_every_set_is_checked_up_front(item, key, converted_tiny, outs):
    err = refused(converted_tiny, outs, ExportOptions(sets=(item,)), UsageError)
    assert f"--set {key}" in err.message and err.hint
    result = run("export", converted_tiny, outs / "o", "--set", item, "--dry-run")
    assert result.exit_code == 2 and f"--set {key}" in result.stderr and "Traceback" not in result.output


def test_set_twice_and_sets_that_fit(converted_tiny, outs):
    refused(converted_tiny, outs, ExportOptions(sets=("seq_length=1", "seq_length=2")), UsageError, "twice")
    fine = ("seq_length=4096", "rotary_emb_base=25000", "num_layers=6", "tokenizer_type=SentencePiece")
    export_release(converted_tiny, outs / "o", ExportOptions(sets=fine))
    _, shards, _ = read_release(outs / "o")
    args = next(iter(shards.values()))["args"]
    assert (args.seq_length, args.rotary_emb_base, args.num_layers) == (4096, 25000, 6)


def test_padding_never_drops_rows(hf, outs):
    """1022 rows at TP=4 are padded to 1024; a divisor < 1 that cut them to 1020 is refused."""
    edit_weights(hf, lambda t: t.update({n: t[n][:1022].clone() for n in (EMBED, HEAD)}))
    edit_config(hf, vocab_size=1022)
    (hf / "conversion.json").unlink()  # args from config.json
    refused(hf, outs, ExportOptions(tp=4, sets=("make_vocab_size_divisible_by=-1",)), UsageError)
    result = export_release(hf, outs / "o", ExportOptions(tp=4))
    assert result.plan.vocab_rows == 1024
