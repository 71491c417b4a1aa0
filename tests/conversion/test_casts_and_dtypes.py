"""convert writes only what is really there: casts never invent inf, torch_dtype names the written dtype,
mixed dtypes need --dtype, --drop-key drops on purpose and says so, conversion.json records the variant."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from reliability_cases import assert_clean_failure
from safetensors import safe_open

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert, prepare
from persimmon_tools.errors import ConversionError, MappingError, UsageError
from persimmon_tools.synth.build import build_release, logical_tensors, write_release_folder

FAST = dict(tokenizer=False)  # the tokenizer has its own tests; these are about weights
BIAS = "layers.0.mlp.dense_4h_to_h.bias"  # [64] in the tiny preset
BIAS_HF = "model.layers.0.mlp.dense_4h_to_h.bias"


def _load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _release(tmp_path, dtype=torch.bfloat16, replace: dict | None = None, name: str = "rel"):
    """A tiny folder release of ``dtype`` with encoder entries replaced/added (real tensors, any dtype)."""
    rel = build_release(seed=0, dtype=dtype)
    enc = rel.objects[(0, 0)]["model"]["language_model"]["encoder"]
    enc.update(replace or {})
    return write_release_folder(rel, tmp_path / name)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# (source dtype, --dtype, values planted in a [64] bias (rest 0.5), values that must become ±inf).
# Written out by hand: a value just above the target's max that rounds down to it is kept, not counted.
CASTS = [
    (torch.float32, "bf16", [3.3895e38, 3.39e38, 3.4e38, -3.4e38, 1e38, -3.3e38], 2),
    (torch.float32, "bf16", [float(torch.finfo(torch.float32).max)] * 5, 5),
    (torch.float32, "fp16", [65504.0, 65519.0, 65520.0, -65520.0, 1e6, -7e4, 6e4], 4),
    (torch.bfloat16, "fp16", [1e5, -7e4, 6e4, 3e38], 3),
    (torch.float64, "fp32", [1e39, -1e300, 3.4028235e38, 3.4e38, 3.4028235677973366e38], 3),
    (torch.float64, "bf16", [1e39, 3.39e38, -3.3e38, 1e-300], 1),
    (torch.float64, "fp16", [65519.0, 65520.0, 1e20], 2),
]


@pytest.mark.parametrize(("src", "dtype", "planted", "expected"), CASTS)
def test_every_narrowing_cast_refuses_values_that_become_inf(tmp_path, src, dtype, planted, expected):
    value = torch.full((64,), 0.5, dtype=src)
    value[: len(planted)] = torch.tensor(planted, dtype=torch.float64).to(src)
    # the release itself is fp32 (fp64 releases do not reproduce inv_freq); --dtype casts everything
    release_dtype = torch.float32 if src == torch.float64 else src
    folder = _release(tmp_path, release_dtype, {BIAS: value})
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert(folder, out, ConvertOptions(dtype=dtype, **FAST))
    assert f"{expected} value(s) exceed the {dtype} range" in err.value.message, err.value.message
    assert f"{BIAS_HF}: {expected}" in err.value.message and "would become inf" in err.value.message
    assert "--allow-overflow" in err.value.hint and "--dtype auto" in err.value.hint
    assert not out.exists()
    convert(folder, out, ConvertOptions(dtype=dtype, allow_overflow=True, **FAST))
    written = _load(out)[BIAS_HF]
    assert int(torch.isinf(written).sum()) == expected
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    kept = torch.isfinite(written)
    assert written.dtype == target and bool((written[kept].double().abs() <= torch.finfo(target).max).all())


def test_in_range_casts_pass_and_values_rounding_down_to_max_are_kept(tmp_path):
    top = torch.finfo(torch.bfloat16).max
    value = torch.full((64,), 0.25, dtype=torch.float32)
    value[:3] = torch.tensor([3.3895e38, -3.39e38, top])  # all round to ±max, never to inf
    folder = _release(tmp_path, torch.float32, {BIAS: value})
    convert(folder, tmp_path / "out", ConvertOptions(dtype="bf16", **FAST))
    written = _load(tmp_path / "out")[BIAS_HF]
    assert written[:3].tolist() == [top, -top, top] and bool(torch.isfinite(written).all())


def test_overflow_refusal_through_the_cli(tmp_path):
    value = torch.full((64,), 0.5, dtype=torch.float32)
    value[:7] = 3.4e38
    folder = _release(tmp_path, torch.float32, {BIAS: value})
    out = tmp_path / "out"
    result = _cli("convert", folder, out, "--dtype", "bf16", "--no-tokenizer", "--no-verify", "-q")
    assert_clean_failure(result, 1)
    assert "7 value(s) exceed the bf16 range" in result.stderr and "Hint: " in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "odd"),
    [
        (BIAS, torch.float32),
        ("layers.1.self_attention.query_key_value.weight", torch.float16),
        ("final_layernorm.weight", torch.float32),
    ],
)
def test_mixed_dtypes_are_refused_unless_dtype_picks_one(tmp_path, key, odd):
    ref = logical_tensors(seed=0)[f"language_model.encoder.{key}"]
    folder = _release(tmp_path, torch.bfloat16, {key: ref.to(odd)})
    name = {torch.float32: "fp32", torch.float16: "fp16"}[odd]
    with pytest.raises(ConversionError) as err:
        prepare(folder, ConvertOptions(**FAST))
    msg = err.value.message
    assert "mixes floating dtypes" in msg and f"language_model.encoder.{key} is {name}" in msg
    assert "language_model.embedding.word_embeddings.weight is bf16" in msg
    assert "--dtype bf16|fp16|fp32" in err.value.hint
    for dtype, torch_dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        out = tmp_path / dtype
        convert(folder, out, ConvertOptions(dtype=dtype, **FAST))
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == torch_dtype
        assert {str(t.dtype).removeprefix("torch.") for t in _load(out).values()} == {torch_dtype}


def test_mixed_dtypes_through_the_cli(tmp_path):
    folder = _release(tmp_path, torch.bfloat16, {BIAS: torch.zeros(64, dtype=torch.float32)})
    out = tmp_path / "out"
    result = _cli("convert", folder, out, "--no-tokenizer", "--no-verify", "-q")
    assert_clean_failure(result, 1)
    assert "mixes floating dtypes" in result.stderr and "Hint: pick the output dtype" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_torch_dtype_is_the_dtype_written(tmp_path, dtype):
    folder = _release(tmp_path, dtype)
    for option in ("auto", "bf16", "fp16", "fp32"):
        out = tmp_path / option
        convert(folder, out, ConvertOptions(dtype=option, allow_overflow=True, **FAST))
        written = {str(t.dtype).removeprefix("torch.") for t in _load(out).values()}
        assert len(written) == 1
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == written.pop()


def test_inv_freq_dtype_does_not_count(tmp_path):
    """inv_freq is never written, so an fp32 buffer beside bf16 weights still converts bit for bit."""
    key = "layers.0.self_attention.rotary_emb.inv_freq"
    half = logical_tensors(seed=0)[f"language_model.encoder.{key}"].numel()
    exact = 1.0 / (25000.0 ** (torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half)))
    folder = _release(tmp_path, torch.bfloat16, {key: exact.float()})
    convert(folder, tmp_path / "out", ConvertOptions(**FAST))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in _load(tmp_path / "out").values()} == {torch.bfloat16}


# ---- --drop-key --------------------------------------------------------------------------------------

ADAPTERS = {
    "layers.0.extra_adapter.weight": torch.ones(4, 64, dtype=torch.bfloat16),
    "layers.1.extra_adapter.bias": torch.ones(4, dtype=torch.bfloat16),
    "layers.1.extra_adapter.scale": torch.ones(1, dtype=torch.bfloat16),
}
ADAPTER_KEYS = sorted(f"language_model.encoder.{k}" for k in ADAPTERS)


def test_drop_key_drops_on_purpose_and_records_it(tmp_path, converted_tiny):
    folder = _release(tmp_path, replace=ADAPTERS)
    with pytest.raises(MappingError) as err:
        prepare(folder, ConvertOptions(**FAST))
    assert all(f"unknown source key {k}" in err.value.message for k in ADAPTER_KEYS)
    pattern = "language_model.encoder.layers.*.extra_adapter.*"
    plan = prepare(folder, ConvertOptions(drop_keys=(pattern,), **FAST))
    assert plan.summary()["dropped_keys"] == ADAPTER_KEYS
    out = tmp_path / "out"
    convert(folder, out, ConvertOptions(drop_keys=(pattern,)))
    record = json.loads((out / "conversion.json").read_text())
    assert record["dropped_keys"] == ADAPTER_KEYS and record["drop_key_patterns"] == [pattern]
    expected = _load(converted_tiny)
    got = _load(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # several patterns, each dropping part of them
    patterns = ("*.layers.0.extra_adapter.weight", "language_model.encoder.layers.1.extra_adapter.*")
    assert prepare(folder, ConvertOptions(drop_keys=patterns, **FAST)).dropped_keys == ADAPTER_KEYS
    # dropping only some leaves the rest unknown
    with pytest.raises(MappingError) as err:
        prepare(folder, ConvertOptions(drop_keys=patterns[:1], **FAST))
    assert "extra_adapter.weight" not in err.value.message and "extra_adapter.bias" in err.value.message
    # without any extra key, a plain conversion records an empty list
    assert json.loads((converted_tiny / "conversion.json").read_text())["dropped_keys"] == []


def test_drop_key_also_drops_non_tensor_leaves(tmp_path):
    """Megatron-core saves `_extra_state` entries that are not tensors; they can be dropped by name too."""
    key = "language_model.encoder.layers.1.self_attention.core_attention._extra_state"
    folder = _release(tmp_path, replace={key.removeprefix("language_model.encoder."): "opaque"})
    with pytest.raises(MappingError) as err:
        prepare(folder, ConvertOptions(**FAST))
    assert f"unexpected non-tensor value at {key}" in err.value.message
    plan = prepare(folder, ConvertOptions(drop_keys=("*._extra_state",), **FAST))
    assert plan.dropped_keys == [key] and len(plan.tensors) == 100


@pytest.mark.parametrize(
    "patterns",
    [
        ("language_model.encoder.layers.*.extra_adaptor.*",),  # typo
        ("*.extra_adapter.*", "layers.0.extra_adapter.weight"),  # second one lacks the prefix
        ("LANGUAGE_MODEL.*",),  # case-sensitive
    ],
)
def test_drop_key_pattern_that_matches_nothing_is_an_error(tmp_path, patterns):
    folder = _release(tmp_path, replace=ADAPTERS)
    with pytest.raises(UsageError) as err:
        prepare(folder, ConvertOptions(drop_keys=patterns, **FAST))
    assert f"--drop-key {patterns[-1]!r} matches none of the checkpoint's" in err.value.message
    assert "fnmatch" in err.value.hint


@pytest.mark.parametrize(
    ("pattern", "target"),
    [
        ("language_model.encoder.layers.1.mlp.dense_h_to_4h.bias", "model.layers.1.mlp.dense_h_to_4h.bias"),
        ("word_embeddings_for_head.*", "lm_head.weight"),
        ("language_model.encoder.final_layernorm.*", "model.final_layernorm.weight"),
    ],
)
def test_dropping_a_needed_key_is_still_missing(releases, tmp_path, pattern, target):
    with pytest.raises(MappingError) as err:
        prepare(releases["folder"], ConvertOptions(drop_keys=(pattern,), **FAST))
    assert f"missing: no source tensor for {target} (" in err.value.message
    assert f"was dropped by --drop-key {pattern!r}" in err.value.message


def test_drop_key_through_the_cli(tmp_path):
    folder = _release(tmp_path, replace=ADAPTERS)
    out = tmp_path / "out"
    typo = _cli("convert", folder, out, "--drop-key", "*.extra_adaptor.*", "--no-tokenizer", "--no-verify")
    assert_clean_failure(typo, 2)
    assert "matches none of the checkpoint's" in typo.stderr and "Hint: " in typo.stderr
    assert not out.exists()
    dry = _cli("convert", folder, out, "--drop-key", "*.extra_adapter.*", "--no-tokenizer", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "dropped (--drop-key): " + ", ".join(ADAPTER_KEYS) in dry.stdout
    ok = _cli(
        "convert", folder, out, "--drop-key", "*.extra_adapter.*", "--no-tokenizer", "--no-verify", "-q"
    )
    assert ok.exit_code == 0, ok.stderr
    assert json.loads((out / "conversion.json").read_text())["dropped_keys"] == ADAPTER_KEYS


# ---- variant record ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "variant"), [("8b_chat_model_release", "chat"), ("8b_base_model_release", "base")]
)
def test_conversion_json_records_which_name_decided_the_variant(tmp_path, name, variant):
    folder = _release(tmp_path, name=name)
    plan = prepare(folder, ConvertOptions(**FAST))
    convert(folder, tmp_path / "out", ConvertOptions(**FAST))
    source = json.loads((tmp_path / "out" / "conversion.json").read_text())["source"]
    assert source["variant"] == variant == plan.summary()["variant"]
    assert (
        source["variant_from"]
        == getattr(plan.release, "variant_from", None)
        == plan.summary()["variant_from"]
    )
    assert source["variant_from"] and name in source["variant_from"]
