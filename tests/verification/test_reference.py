"""The reference forward pass: its maths against transformers, its Megatron conventions, TP/PP reading."""

from __future__ import annotations

import pytest
import torch

from persimmon_tools.verification.reference import (
    MEGATRON_GLOBALS,
    MegatronWeights,
    attention,
    gather_rows,
    inv_freq_fp32,
    partial_rope,
    rotary_tables,
)
from persimmon_tools.verification.run import LayerwiseModel
from persimmon_tools.verification.source_merge import load_source

transformers = pytest.importorskip("transformers")

SEQS = [[3, 17, 250, 9, 42, 511, 600, 7, 1023, 0, 12], list(range(5, 305))]  # one of 300 tokens

# Spec §D, written out here (not taken from persimmon_tools.mapping), to load transformers directly.
_RENAMES = (
    ("language_model.embedding.word_embeddings.", "model.embed_tokens."),
    ("language_model.encoder.", "model."),
    ("word_embeddings_for_head.", "lm_head."),
    (".self_attention.", ".self_attn."),
)


@pytest.fixture(scope="module")
def tiny_weights(releases) -> MegatronWeights:
    return MegatronWeights(load_source(releases["tar"]))


@pytest.fixture(scope="module")
def hf_from_megatron(tiny_weights):
    """PersimmonForCausalLM built from the Megatron tensors with spec §D names and the args' values."""
    from transformers import PersimmonConfig, PersimmonForCausalLM

    args, hp = tiny_weights.ckpt.args, tiny_weights.hyper
    config = PersimmonConfig(
        vocab_size=args.padded_vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        layer_norm_eps=args.layernorm_epsilon,
        rope_theta=args.rotary_emb_base,
        partial_rotary_factor=args.rotary_pct,
        max_position_embeddings=args.seq_length,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    assert hp.rotary_dim == int(args.rotary_pct * hp.head_dim)
    state = {}
    for key, mt in tiny_weights.ckpt.tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        for old, new in _RENAMES:
            key = key.replace(old, new)
        state[key] = mt.materialize().float()
    model = PersimmonForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing)
    return model


def _hf_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


def test_reference_matches_transformers_fp32(tiny_weights, hf_from_megatron):
    """The test that validates the maths: independent code, same numbers (fp32, ~1e-6 of the scale)."""
    ref = LayerwiseModel(tiny_weights, dtype=torch.float32).forward(SEQS)
    for seq, r in zip(SEQS, ref, strict=True):
        hf = _hf_logits(hf_from_megatron, seq)
        assert r.shape == hf.shape == (len(seq), tiny_weights.hyper.vocab_size)
        scale = float(r.abs().max())
        assert scale > 0.1
        assert float((r - hf).abs().max()) <= 1e-5 * scale
        assert torch.equal(r.argmax(-1), hf.argmax(-1))


def test_reference_is_sensitive(tiny_weights, hf_from_megatron):
    """Guard against a test that cannot fail: a small change of one weight moves the reference logits."""
    ref = LayerwiseModel(tiny_weights).forward(SEQS[:1])[0]
    layer = hf_from_megatron.model.layers[2].self_attn
    saved = layer.k_layernorm.weight.detach().clone()
    with torch.no_grad():
        layer.k_layernorm.weight.mul_(1.05)
        hf = _hf_logits(hf_from_megatron, SEQS[0])
        layer.k_layernorm.weight.copy_(saved)
    assert float((ref - hf).abs().max()) > 1e-4 * float(ref.abs().max())


def test_tp_pp_shards_give_identical_logits(releases, tiny_weights):
    """TP/PP releases of the same seed hold the same logical tensors: the reference must agree bit for bit."""
    ref = LayerwiseModel(tiny_weights).forward(SEQS[:1])[0]
    for name in ("tp2", "pp2", "tp2pp3"):
        weights = MegatronWeights(load_source(releases[name]))
        assert weights.hyper.num_layers == tiny_weights.hyper.num_layers
        assert torch.equal(LayerwiseModel(weights).forward(SEQS[:1])[0], ref), name


def test_gather_rows_reads_vocab_parallel_parts(releases):
    ckpt = load_source(releases["tp2"])
    mt = ckpt.tensors[MEGATRON_GLOBALS["embed"]]
    assert len(mt.parts) == 2
    ids = [0, 511, 512, 1023, 512, 7]  # both sides of the rank boundary, repeated id
    assert torch.equal(gather_rows(mt, ids), mt.materialize()[ids])
    with pytest.raises(IndexError):
        gather_rows(mt, [1024])


def test_megatron_hyper_from_args(tiny_weights):
    hp, args = tiny_weights.hyper, tiny_weights.ckpt.args
    assert (hp.num_layers, hp.hidden_size, hp.num_heads, hp.head_dim) == (6, 64, 4, 16)
    assert hp.rotary_dim == 8 and hp.rope_theta == args.rotary_emb_base and hp.eps == args.layernorm_epsilon
    assert hp.source_of("rope_theta") == "args.rotary_emb_base"
    assert hp.stored_inv_freq is not None and len(hp.stored_inv_freq) == 4


def test_qkv_split_is_megatron_per_head_interleaved():
    """Row h*3*hd + t*hd + d of the fused weight is head h, part t (q/k/v), dim d (spec §C)."""
    from persimmon_tools.verification.reference import Hyper, LayerWeights

    nh, hd, C = 2, 4, 8
    hp = Hyper(
        vocab_size=4,
        hidden_size=C,
        num_layers=1,
        num_heads=nh,
        head_dim=hd,
        intermediate_size=4,
        rotary_dim=0,
        rope_theta=1e4,
        eps=1e-5,
        untied=True,
        qk_layernorm=False,
    )
    eye = torch.eye(C)
    z = torch.zeros
    # Q of head 1 = identity on dims 0..3; K of head 1 likewise; V of head 1 = dims 4..7; everything else 0.
    w = z(nh, 3, hd, C)
    w[1, 0] = eye[:hd]
    w[1, 1] = eye[:hd]
    w[1, 2] = eye[hd:]
    lw = LayerWeights(
        z(C),
        z(C),
        w.reshape(nh * 3 * hd, C),
        z(nh * 3 * hd),
        z(hd),
        z(hd),
        z(hd),
        z(hd),
        torch.eye(C),
        z(C),
        z(C),
        z(C),
        z(4, C),
        z(4),
        z(C, 4),
        z(C),
    )
    a = torch.randn(3, C)
    cos, sin = torch.ones(3, 0), torch.zeros(3, 0)
    y = attention(a, lw, hp, cos, sin)  # (T, C): head 0 outputs zeros, head 1 outputs attention over V
    assert torch.allclose(y[:, :hd], torch.zeros(3, hd))
    assert torch.allclose(y[0, hd:], a[0, hd:])  # position 0 attends to itself only


def test_partial_rope_matches_transformers_rotate_half():
    from transformers.models.persimmon.modeling_persimmon import apply_rotary_pos_emb

    T, nh, hd, rd = 5, 3, 16, 8
    x = torch.randn(T, nh, hd)
    inv = inv_freq_fp32(25000.0, rd)
    freqs = torch.arange(T).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    ours = partial_rope(x, cos, sin)
    q = x.transpose(0, 1)[None]  # (1, nh, T, hd)
    rot, _ = apply_rotary_pos_emb(q[..., :rd], q[..., :rd], cos[None], sin[None])
    assert torch.allclose(ours[..., :rd], rot[0].transpose(0, 1), atol=1e-6)
    assert torch.equal(ours[..., rd:], x[..., rd:])  # the rest passes through untouched


def test_adept_rotary_is_bf16(tiny_weights):
    hp = tiny_weights.hyper
    cos_hf, sin_hf = rotary_tables(2000, hp, "hf", torch.float32, "cpu")
    cos_ad, sin_ad = rotary_tables(2000, hp, "adept", torch.float32, "cpu")
    assert torch.equal(cos_ad[0], cos_hf[0])  # position 0: angle 0 in both
    assert float((cos_ad[:8] - cos_hf[:8]).abs().max()) < 0.05
    assert float((cos_ad[1000:] - cos_hf[1000:]).abs().max()) > 0.5  # bf16 positions: 1001 -> 1000, ...
    # positions 256 and 257 collapse to the same bf16 value, so their adept tables are identical
    assert torch.equal(cos_ad[256], cos_ad[257]) and not torch.equal(cos_hf[256], cos_hf[257])
