"""Export of an HF folder written by transformers itself (issue 17, "Done when" 3 and vocab padding).

``save_pretrained`` of a tiny random PersimmonForCausalLM (single ``model.safetensors`` and index + shards)
with the bundled SentencePiece model as ``tokenizer.model``: args are derived from ``config.json`` (listed by
``--dry-run``; ``--set`` lands in args), and export -> convert gives the folder's tensors bit for bit.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources

import pytest
import torch
from click.testing import CliRunner
from export_helpers import assert_same_hf, flat, hf_tensors, listing, raw, read_release

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import UsageError
from persimmon_tools.export.export import ExportOptions, export_release, prepare

transformers = pytest.importorskip("transformers")

VOCAB_MODEL = resources.files("persimmon_tools").joinpath("data/tiny_vocab.model")


def _save(model, folder, tokenizer=True, **kwargs):
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        (folder / "tokenizer.model").write_bytes(VOCAB_MODEL.read_bytes())
    return folder


def _model(seed=0, **overrides):
    dims = dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rope_theta=25000.0,
    )
    torch.manual_seed(seed)
    return transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**(dims | overrides))).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("export_tf")
    model = _model()
    out = {
        "single": _save(model, base / "single"),
        "sharded": _save(model, base / "sharded", max_shard_size="200KB"),
        "no_tokenizer": _save(model, base / "no_tokenizer", tokenizer=False),
    }
    assert (out["single"] / "model.safetensors").exists()
    assert (out["sharded"] / "model.safetensors.index.json").exists()
    assert len(list(out["sharded"].glob("model-*.safetensors"))) > 1
    return out


@pytest.mark.parametrize("layout", [(1, 1), (2, 3), (4, 2)], ids=str)
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_transformers_folder_round_trips(kind, layout, folders, tmp_path):
    tp, pp = layout
    out = tmp_path / "out.tar"
    result = export_release(folders[kind], out, ExportOptions(tp=tp, pp=pp, tar=True))
    plan = result.plan
    assert plan.source.args_from == "config.json" and plan.dtype == torch.float32
    assert plan.name == "persimmon_model_release" and plan.iteration == 1
    back = tmp_path / "back"
    convert(out, back, ConvertOptions(tokenizer=False))
    assert_same_hf(folders[kind], back)
    name, shards, small = read_release(out)
    assert name == "persimmon_model_release"
    assert small["adept_vocab.model"] == VOCAB_MODEL.read_bytes()
    for obj in shards.values():
        args = vars(obj["args"])
        assert args["num_layers"] == 6 and args["hidden_size"] == 64 and args["ffn_hidden_size"] == 256
        assert args["num_attention_heads"] == 4 and args["kv_channels"] == 16
        assert args["rotary_pct"] == 0.5 and args["rotary_emb_base"] == 25000
        assert args["seq_length"] == 2048 and args["max_position_embeddings"] == 2048
        assert args["untie_embeddings"] is True and args["sq_relu"] is True
        assert args["params_dtype"] == torch.float32 and args["bf16"] is False and args["fp16"] is False
        assert args["padded_vocab_size"] == 1024 and args["tensor_model_parallel_size"] == tp
        assert obj["iteration"] == 1 and obj["checkpoint_version"] == 3.0


def test_dry_run_lists_derived_values_and_writes_nothing(folders, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["export", str(folders["sharded"]), str(out), "--dry-run", "--set", "seq_length=4096"]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "dry run: nothing written" in text
    assert "args.num_layers = 6  (config.json num_hidden_layers)" in text
    assert "args.hidden_size = 64  (config.json hidden_size)" in text
    assert "args.rotary_emb_base = 25000  (config.json rope_theta)" in text
    assert "args.seq_length = 4096  (--set)" in text
    assert "persimmon_model_release/iter_0000001/mp_rank_00/model_optim_rng.pt" in text
    assert listing(tmp_path) == []
    as_json = CliRunner().invoke(main, ["export", str(folders["single"]), str(out), "--dry-run", "--json"])
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.stdout)
    derived = {d["field"]: (d["value"], d["from"]) for d in plan["derived_args"]}
    assert derived["ffn_hidden_size"] == (256, "config.json intermediate_size")
    assert derived["params_dtype"][0] == "torch.float32"
    assert plan["args_from"] == "config.json" and plan["source_kind"] == "hf"
    assert listing(tmp_path) == []


def test_set_lands_in_args(folders, tmp_path):
    out = tmp_path / "out"
    sets = ("seq_length=4096", "tokenizer_type='SentencePiece'", "consumed_train_samples=12")
    export_release(folders["single"], out, ExportOptions(tp=2, sets=sets))
    _, shards, _ = read_release(out)
    assert len(shards) == 2
    for obj in shards.values():
        assert obj["args"].seq_length == 4096 and obj["args"].max_position_embeddings == 2048
        assert obj["args"].consumed_train_samples == 12


def test_missing_tokenizer_is_a_clear_error_and_vocab_fixes_it(folders, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="no tokenizer.model") as err:
        export_release(folders["no_tokenizer"], out, ExportOptions())
    assert "--vocab" in err.value.hint
    cli = CliRunner().invoke(main, ["export", str(folders["no_tokenizer"]), str(out)])
    assert cli.exit_code == 2 and "tokenizer.model" in cli.stderr
    assert listing(tmp_path) == []
    vocab = tmp_path / "my.model"
    vocab.write_bytes(VOCAB_MODEL.read_bytes())
    export_release(folders["no_tokenizer"], out, ExportOptions(vocab=vocab))
    _, _, small = read_release(out)
    assert small["adept_vocab.model"] == vocab.read_bytes()


def test_vocab_padding_to_a_multiple_of_128_tp(tmp_path):
    """vocab 1001 at TP=8 (8 heads): zero rows up to 1024 = 128 x 8, a note, args.padded_vocab_size 1024."""
    hf = _save(_model(seed=4, vocab_size=1001, num_attention_heads=8), tmp_path / "hf")
    plan = prepare(hf, ExportOptions(tp=8))
    assert plan.vocab_rows == 1024
    assert any("padded with 23 zero rows to 1024" in n for n in plan.notes), plan.notes
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(hf), str(out), "--tp", "8", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["vocab_rows"] == 1024 and summary["vocab_padding_rows"] == 23
    assert any("1024" in n for n in summary["notes"])
    _, shards, _ = read_release(out)
    assert len(shards) == 8
    src = hf_tensors(hf)
    for key, hf_name in (
        ("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("word_embeddings_for_head.weight", "lm_head.weight"),
    ):
        pieces = [
            flat(shards[f"iter_0000001/mp_rank_{t:02d}/model_optim_rng.pt"]["model"])[key] for t in range(8)
        ]
        assert all(tuple(p.shape) == (128, 64) for p in pieces)
        full = torch.cat(pieces)
        assert torch.equal(raw(full[:1001]), raw(src[hf_name]))
        assert not full[1001:].any()
    assert {obj["args"].padded_vocab_size for obj in shards.values()} == {1024}
    # TP=1 (and any TP that divides 1001's rows) keeps the rows as they are
    assert prepare(hf, ExportOptions(tp=1)).vocab_rows == 1001


def test_transformers_bf16_folder_and_dtype_override(tmp_path):
    hf = _save(_model(seed=6).to(torch.bfloat16), tmp_path / "hf")
    out = tmp_path / "out.tar"
    export_release(hf, out, ExportOptions(tp=2, pp=2, tar=True))
    back = tmp_path / "back"
    convert(out, back, ConvertOptions(tokenizer=False))
    assert_same_hf(hf, back)
    out32 = tmp_path / "out32"
    export_release(hf, out32, ExportOptions(dtype="fp32"))
    _, shards, _ = read_release(out32)
    (obj,) = shards.values()
    assert obj["args"].params_dtype == torch.float32 and obj["args"].bf16 is False
    shutil.rmtree(back)
    convert(out32, back, ConvertOptions(dtype="bf16", tokenizer=False))
    assert_same_hf(hf, back)


def test_tied_embeddings_round_trip_at_pp1_and_refuse_pp2(tmp_path):
    hf = _save(_model(seed=8, tie_word_embeddings=True), tmp_path / "hf")
    assert "lm_head.weight" not in hf_tensors(hf)
    out = tmp_path / "out.tar"
    export_release(hf, out, ExportOptions(tp=2, tar=True))
    _, shards, _ = read_release(out)
    for obj in shards.values():
        assert "word_embeddings_for_head" not in obj["model"] and obj["args"].untie_embeddings is False
    back = tmp_path / "back"
    convert(out, back, ConvertOptions(tokenizer=False))
    assert_same_hf(hf, back)
    with pytest.raises(UsageError, match="PP=2 with tied embeddings"):
        export_release(hf, tmp_path / "o2", ExportOptions(pp=2))
    assert not (tmp_path / "o2").exists()
