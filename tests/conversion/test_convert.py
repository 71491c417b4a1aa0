"""convert: bit-identical outputs across layouts, transformers loads them, dtypes, atomic output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from persimmon_tools.conversion.convert import ConvertOptions, convert, prepare
from persimmon_tools.errors import ConversionError
from persimmon_tools.synth.build import build_release, logical_tensors, write_release_folder


def _load_folder(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])) for k in a
    )


# Written by hand from spec §D, independently of persimmon_tools.mapping.
def _hf_name(megatron_key: str) -> str | None:
    if megatron_key.endswith("rotary_emb.inv_freq"):
        return None
    if megatron_key == "word_embeddings_for_head.weight":
        return "lm_head.weight"
    if megatron_key == "language_model.embedding.word_embeddings.weight":
        return "model.embed_tokens.weight"
    return megatron_key.replace("language_model.encoder.", "model.").replace(
        ".self_attention.", ".self_attn."
    )


def test_auto_dtype_is_bit_identical_to_the_generator(converted_tiny):
    out = _load_folder(converted_tiny)
    expected = {_hf_name(k): v for k, v in logical_tensors(seed=0).items() if _hf_name(k)}
    assert len(out) == 6 * 16 + 4 == len(expected)
    assert _same_bits(out, expected)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp3", "folder"])
def test_sharded_layouts_convert_bit_identically(layout, releases, converted_tiny, tmp_path):
    out = tmp_path / "hf"
    convert(releases[layout], out, ConvertOptions())
    assert _same_bits(_load_folder(out), _load_folder(converted_tiny))
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (out, converted_tiny))
    assert cfg == ref_cfg


def test_iteration_folder_and_single_pt_inputs(releases, converted_tiny, tmp_path):
    folder = releases["folder"]
    for i, source in enumerate(
        [folder / "iter_0001251", folder / "iter_0001251" / "mp_rank_00" / "model_optim_rng.pt"]
    ):
        out = tmp_path / f"hf{i}"
        convert(source, out, ConvertOptions())
        assert _same_bits(_load_folder(out), _load_folder(converted_tiny))


def test_config_comes_from_the_checkpoint(converted_tiny):
    cfg = json.loads((converted_tiny / "config.json").read_text())
    assert cfg["model_type"] == "persimmon" and cfg["num_hidden_layers"] == 6 and cfg["hidden_size"] == 64
    assert cfg["num_attention_heads"] == 4 and cfg["intermediate_size"] == 256 and cfg["vocab_size"] == 1024
    assert (
        cfg["partial_rotary_factor"] == 0.5 and cfg["rope_theta"] == 25000.0 and cfg["layer_norm_eps"] == 1e-5
    )
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 3  # |ENDOFTEXT| in the bundled vocab
    assert (
        cfg["tie_word_embeddings"] is False
        and cfg["hidden_dropout"] == 0.0
        and cfg["torch_dtype"] == "bfloat16"
    )
    gen = json.loads((converted_tiny / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == 3
    conv = json.loads((converted_tiny / "conversion.json").read_text())
    assert conv["source"]["iteration"] == 1251 and conv["dtype"] == "bfloat16"
    assert (converted_tiny / "tokenizer.model").is_file()


def test_non_default_hyperparameters_reach_config(tmp_path):
    rel = build_release(seed=1, rope_base=10000.0, eps=1e-6, rotary_pct=0.25, seq_length=512)
    folder = write_release_folder(rel, tmp_path / "rel")
    out = tmp_path / "hf"
    convert(folder, out, ConvertOptions())
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["layer_norm_eps"], cfg["partial_rotary_factor"]) == (10000.0, 1e-6, 0.25)
    assert cfg["max_position_embeddings"] == 512


def test_transformers_loads_it_and_matches_a_model_built_from_the_generator(converted_tiny):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.PersimmonForCausalLM.from_pretrained(
        converted_tiny, output_loading_info=True, torch_dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = transformers.PersimmonConfig.from_pretrained(converted_tiny)
    direct = transformers.PersimmonForCausalLM(cfg).to(torch.float32).eval()
    state = {_hf_name(k): v.float() for k, v in logical_tensors(seed=0).items() if _hf_name(k)}
    missing, unexpected = direct.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.tensor([[3, 17, 250, 9, 1000, 42, 7, 599]])
    with torch.no_grad():
        a = model.eval()(ids).logits
        b = direct(ids).logits
    assert torch.equal(a, b)
    assert a.abs().max() > 0


def test_dtype_conversions(releases, tmp_path, converted_tiny):
    ref = _load_folder(converted_tiny)
    convert(releases["tar"], tmp_path / "fp32", ConvertOptions(dtype="fp32", max_shard_size="200KB"))
    out = _load_folder(tmp_path / "fp32")
    assert (tmp_path / "fp32" / "model.safetensors.index.json").is_file()
    assert all(out[k].dtype == torch.float32 and torch.equal(out[k], ref[k].float()) for k in ref)
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
    convert(releases["tar"], tmp_path / "fp16", ConvertOptions(dtype="fp16"))
    assert all(v.dtype == torch.float16 for v in _load_folder(tmp_path / "fp16").values())


def _release_with(tmp_path, key: str, value: torch.Tensor, dtype=torch.bfloat16):
    rel = build_release(seed=0, dtype=dtype)
    rel.objects[(0, 0)]["model"]["language_model"]["encoder"][key] = value
    return write_release_folder(rel, tmp_path / "rel")


def test_fp16_overflow_is_counted_and_refused(tmp_path):
    big = torch.full((64,), 1e6, dtype=torch.float32)
    folder = _release_with(tmp_path, "layers.0.mlp.dense_4h_to_h.bias", big, dtype=torch.float32)
    with pytest.raises(ConversionError) as err:
        convert(folder, tmp_path / "out", ConvertOptions(dtype="fp16"))
    assert (
        "64 value(s) exceed the fp16 range" in err.value.message and "dense_4h_to_h.bias" in err.value.message
    )
    assert not (tmp_path / "out").exists()
    convert(folder, tmp_path / "out", ConvertOptions(dtype="fp16", allow_overflow=True))
    assert torch.isinf(_load_folder(tmp_path / "out")["model.layers.0.mlp.dense_4h_to_h.bias"]).all()


def test_nonfinite_weights_are_refused_with_counts(tmp_path):
    bad = torch.ones(64, dtype=torch.bfloat16)
    bad[:3] = float("nan")
    bad[5] = float("inf")
    folder = _release_with(tmp_path, "layers.2.input_layernorm.weight", bad)
    with pytest.raises(ConversionError) as err:
        convert(folder, tmp_path / "out", ConvertOptions())
    assert (
        "model.layers.2.input_layernorm.weight: 4" in err.value.message
        and "--allow-nonfinite" in err.value.hint
    )
    assert not (tmp_path / "out").exists()
    convert(folder, tmp_path / "out", ConvertOptions(allow_nonfinite=True))


def test_dry_run_plan_writes_nothing(releases, tmp_path):
    plan = prepare(releases["tp2pp3"], ConvertOptions(max_shard_size="300KB"))
    summary = plan.summary()
    assert summary["tensors"] == 100 and summary["tp"] == 2 and summary["pp"] == 3
    assert len(summary["shards"]) >= 3 and summary["bytes"] == sum(
        s["bytes"] for s in summary["shards"].values()
    )
    assert summary["estimated_peak_memory_bytes"] > 0
    assert list(tmp_path.iterdir()) == []


def test_output_dir_is_all_or_nothing(releases, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="not empty"):
        convert(releases["tar"], out, ConvertOptions())
    with pytest.raises(ConversionError, match="keep.txt"):  # --force replaces only what a conversion wrote
        convert(releases["tar"], out, ConvertOptions(force=True))
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    convert(releases["tar"], out, ConvertOptions(max_shard_size="200KB"))  # an earlier conversion
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import persimmon_tools.conversion.convert as conv

    def boom(*a, **k):
        raise RuntimeError("disk exploded")

    monkeypatch.setattr(conv, "write_index", boom)
    with pytest.raises(RuntimeError):
        convert(releases["tar"], out, ConvertOptions(force=True, max_shard_size="200KB"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # temp folder and lock removed
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old content untouched
    monkeypatch.undo()
    convert(releases["tar"], out, ConvertOptions(force=True))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_strided_and_offset_views_from_torch_save_convert_exactly(tmp_path):
    """Tensors saved by torch.save as views (storage offset, transposed strides) convert to the same values."""
    rel = build_release(seed=0)
    enc = rel.objects[(0, 0)]["model"]["language_model"]["encoder"]
    w = logical_tensors(seed=0)["language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"]  # [64, 256]
    enc["layers.1.mlp.dense_4h_to_h.weight"] = w.t().contiguous().t()  # same values, column-major strides
    big = torch.cat([torch.zeros(7, dtype=w.dtype), w.reshape(-1)])
    enc["layers.2.mlp.dense_4h_to_h.weight"] = big[7:].view(64, 256)  # a view at a storage offset
    folder = write_release_folder(rel, tmp_path / "rel")
    # replace the .pt with one written by torch.save itself, which keeps views and strides as they are
    from persimmon_tools.megatron.ptwriter import TensorSpec
    from persimmon_tools.synth.shard import with_adept_module

    def real(obj):
        if isinstance(obj, TensorSpec):
            return torch.cat(list(obj.blocks())).reshape(obj.shape)
        if isinstance(obj, dict):
            return type(obj)((k, real(v)) for k, v in obj.items())
        if isinstance(obj, list):
            return [real(v) for v in obj]
        return obj

    pt = folder / "iter_0001251" / "mp_rank_00" / "model_optim_rng.pt"
    obj = real(rel.objects[(0, 0)])
    with_adept_module(lambda: torch.save(obj, pt))
    convert(folder, tmp_path / "hf", ConvertOptions(max_shard_size="100KB"))
    out = _load_folder(tmp_path / "hf")
    assert torch.equal(out["model.layers.1.mlp.dense_4h_to_h.weight"], w)
    assert torch.equal(out["model.layers.2.mlp.dense_4h_to_h.weight"], w)


def test_vocabulary_larger_than_the_embedding_is_refused_before_writing(releases, tmp_path):
    import sentencepiece as spm

    from persimmon_tools.synth.build import bundled_vocab

    big = tmp_path / "big.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(
            ["alpha beta gamma delta epsilon"] * 50 + [f"word{i} token{i}" for i in range(3000)]
        ),
        model_prefix=str(tmp_path / "big"),
        vocab_size=1500,
        model_type="unigram",
        minloglevel=2,
    )
    assert big.stat().st_size > 0 and len(bundled_vocab()) > 0
    with pytest.raises(
        ConversionError, match="1500 pieces but the checkpoint's embedding has only 1024 rows"
    ):
        convert(releases["tar"], tmp_path / "out", ConvertOptions(vocab=big))
    assert not (tmp_path / "out").exists()
