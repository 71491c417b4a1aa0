"""The one reader of config.json: export and verify's converted side read it the same way, as transformers."""

from __future__ import annotations

import pytest
import torch

from persimmon_tools.conversion.config import ModelDims, hf_config
from persimmon_tools.conversion.hf_config import parse_hf_config
from persimmon_tools.errors import ConfigError, VerificationError
from persimmon_tools.export.source import hf_dims
from persimmon_tools.verification.hf_side import hf_hyper

DIMS = ModelDims(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=256,
    num_layers=6,
    num_heads=4,
    head_dim=16,
    rotary_dim=8,
    rope_theta=25000.0,
    layer_norm_eps=1e-5,
    max_position_embeddings=2048,
    untied=True,
)


def _config(**changes):
    config = hf_config(DIMS, torch.bfloat16, 1)
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    return config


def test_what_convert_writes_reads_back_as_the_same_dims(tmp_path):
    assert hf_dims(_config(), tmp_path) == DIMS
    hyper = hf_hyper(_config())
    assert (hyper.rotary_dim, hyper.rope_theta, hyper.max_positions, hyper.untied) == (8, 25000.0, 2048, True)
    assert dict(hyper.origin) == {
        "rope_theta": "config.json",
        "rotary_dim": "config.json",
        "eps": "config.json",
    }


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hidden_size", "64", "expected a whole number >= 1"),
        ("vocab_size", 1.5, "expected a whole number >= 1"),
        ("num_hidden_layers", None, "expected a whole number >= 1"),
        ("intermediate_size", True, "expected a whole number >= 1"),
        ("max_position_embeddings", 0, "expected a whole number >= 1"),
        ("rope_theta", float("inf"), "expected a finite number > 0"),
        ("partial_rotary_factor", "half", "expected a finite number > 0"),
        ("layer_norm_eps", -1, "expected a finite number > 0"),
        ("rope_parameters", [1, 2], "expected an object"),
        ("tie_word_embeddings", "false", "expected true or false"),
        ("hidden_act", ["relu2"], "expected a string"),
        ("num_attention_heads", 3, "hidden_size 64 is not a multiple of 3 heads"),
        ("model_type", "llama", "model_type is 'llama', not 'persimmon'"),
        ("vocab_size", ..., "lacks 'vocab_size'"),
    ],
)
def test_export_and_verify_refuse_the_same_values_with_the_same_words(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as exported:
        hf_dims(_config(**{key: value}), tmp_path)
    with pytest.raises(VerificationError) as verified:
        hf_hyper(_config(**{key: value}))
    assert expected in exported.value.message and key in exported.value.message
    assert str(tmp_path / "config.json") in exported.value.message
    assert (
        exported.value.message.split("config.json", 1)[1] == verified.value.message.split("config.json", 1)[1]
    )
    assert verified.value.hint == "convert again" and "PersimmonForCausalLM" in exported.value.hint


def test_rope_values_come_from_rope_parameters_then_the_top_level_then_transformers_defaults():
    nested = _config(rope_parameters={"rope_theta": 500.0, "rope_type": "default"}, rope_theta=7.0)
    cfg = parse_hf_config(nested)
    assert cfg.rope_theta == 500.0 and cfg.partial_rotary_factor == 0.5 and not cfg.defaulted
    bare = parse_hf_config(_config(rope_theta=..., partial_rotary_factor=..., layer_norm_eps=...))
    assert (bare.rope_theta, bare.partial_rotary_factor, bare.layer_norm_eps) == (10000.0, 0.5, 1e-5)
    assert bare.defaulted == {"rope_theta", "partial_rotary_factor", "layer_norm_eps"}
    origin = dict(hf_hyper(_config(rope_theta=..., partial_rotary_factor=...)).origin)
    assert origin == {
        "rope_theta": "transformers' default 10000",
        "rotary_dim": "transformers' default 0.5",
        "eps": "config.json",
    }
    assert parse_hf_config(_config(max_position_embeddings=...)).max_position_embeddings is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"hidden_act": "silu"}, "hidden_act 'silu'; ADEPT's MLP is squared ReLU (relu2) or GeLU"),
        ({"qk_layernorm": False}, "qk_layernorm is False"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ],
)
def test_what_adept_cannot_hold_is_exports_own_refusal(tmp_path, change, words):
    with pytest.raises(ConfigError) as err:
        hf_dims(_config(**change), tmp_path)
    assert words in err.value.message and err.value.hint == "this model cannot be expressed in ADEPT's layout"
    hf_hyper(_config(**change))  # verify reads it (and reports it as a finding)


def test_the_reader_agrees_with_transformers():
    transformers = pytest.importorskip("transformers")
    saved = transformers.PersimmonConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.25},
        layer_norm_eps=1e-6,
    ).to_dict()
    cfg = parse_hf_config(saved)
    back = transformers.PersimmonConfig(**saved)
    assert cfg.rope_theta == back.rope_parameters["rope_theta"] == 25000.0
    assert cfg.rotary_dim == int(back.rope_parameters["partial_rotary_factor"] * 16) == 4
    assert (cfg.layer_norm_eps, cfg.max_position_embeddings, cfg.untied, cfg.hidden_act) == (
        back.layer_norm_eps,
        back.max_position_embeddings,
        not back.tie_word_embeddings,
        back.hidden_act,
    )
