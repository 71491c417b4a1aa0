"""An independent Persimmon forward pass, written from the spec (§F), on the Megatron-named tensors.

This is the yardstick ``verify`` holds a converted folder against. It reads the original checkpoint by
Megatron names (spec §B.2) and its hyper-parameters from ``ckpt.args`` and the tensor shapes; it never uses
the converter's mapping table (:mod:`persimmon_tools.mapping`), its config derivation or transformers, so
a mistake there shows up as a difference here. Nor does it use the converter's *merge*
(:mod:`persimmon_tools.megatron.checkpoint`): the checkpoint comes from verify's own interpretation of
the shared byte layer (:mod:`persimmon_tools.verification.source_merge`), so a merge bug in ``convert``
cannot hide by feeding the same wrong weights to both sides (:mod:`persimmon_tools.verification.agreement`
compares the two interpretations before any forward pass). This module imports nothing from ``megatron``,
``mapping``, ``ops`` or ``conversion``.

One layer, pre-LN (``T`` tokens, ``C`` hidden, ``nh`` heads, ``hd`` head_dim, ``rd`` rotary dims)::

    a = LN(h)                                   input_layernorm (weight and bias)
    q, k, v = split(a @ Wqkv.T + b)             fused QKV, per-head [q|k|v] (Megatron's own view, §C)
    q, k = LN_q(q), LN_k(k)                     QK-LayerNorm over hd, one weight shared by all heads
    q, k = rope(q), rope(k)                     rotate-half on the first rd dims of each head only
    y = softmax(q k^T / sqrt(hd) + causal) v    then heads concatenated head-major, dense with bias
    h = h + y
    h = h + W2 relu(W1 LN(h) + b1)^2 + b2       squared ReLU
    logits = LN_final(h) @ Whead.T              untied head, no bias

The maths (functions below) is shared with the HF-side loader of ``verify``; what differs is where the
*inputs* come from (Megatron names + args here, HF names + config.json there). The tiny-model test
against ``transformers.PersimmonForCausalLM`` is what validates the maths itself.

Memory: weights are loaded one layer at a time; embedding rows are gathered for the prompt ids only and
the head is applied in row blocks, so an 8B check never holds the whole model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from persimmon_tools.errors import ConfigError
from persimmon_tools.verification.source_checks import arg, named_arg, stored_inv_freq_problems
from persimmon_tools.verification.source_merge import SourceCheckpoint, SourceTensor

log = logging.getLogger(__name__)

ADEPT_EPS = 1e-5  # megatron/arguments.py --layernorm-epsilon default (§B.5)
ADEPT_ROPE_BASE = 25000.0  # megatron/arguments.py --rotary-emb-base default
ROTARY_MODES = ("hf", "adept")
_HEAD_BLOCK_BYTES = 64 << 20


# ---------------------------------------------------------------- hyper-parameters and weights


@dataclass(frozen=True)
class Hyper:
    """What the forward pass needs to know, and where each value came from (``origin``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    rotary_dim: int
    rope_theta: float
    eps: float
    untied: bool
    qk_layernorm: bool = True
    hidden_act: str = "relu2"  # the HF side may say otherwise (a broken config.json); see ACTIVATIONS
    rope_scaling: str | None = None  # a non-default rope type named by config.json (reported, not applied)
    max_positions: int | None = None
    stored_inv_freq: tuple[float, ...] | None = None  # the checkpoint's bf16 buffer (adept rotary mode)
    origin: tuple[tuple[str, str], ...] = ()  # (field, "args.rotary_emb_base" / "config.json" / ...)

    def source_of(self, name: str) -> str:
        return dict(self.origin).get(name, "?")

    def num_parameters(self) -> int:
        c, f, a = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim
        per_layer = 4 * c + 3 * a * (c + 1) + 4 * self.head_dim + c * (a + 1) + f * (c + 1) + c * (f + 1)
        return self.vocab_size * c * (2 if self.untied else 1) + self.num_layers * per_layer + 2 * c


@dataclass
class LayerWeights:
    """One decoder layer. Layouts ``[out, in]``; ``qkv_w``: ``[nh*3*hd, C]``, per-head ``[q|k|v]``."""

    input_ln_w: torch.Tensor  # (C,)
    input_ln_b: torch.Tensor  # (C,)
    qkv_w: torch.Tensor  # (3*nh*hd, C)
    qkv_b: torch.Tensor  # (3*nh*hd,)
    q_ln_w: torch.Tensor  # (hd,)
    q_ln_b: torch.Tensor  # (hd,)
    k_ln_w: torch.Tensor  # (hd,)
    k_ln_b: torch.Tensor  # (hd,)
    dense_w: torch.Tensor  # (C, nh*hd)
    dense_b: torch.Tensor  # (C,)
    post_ln_w: torch.Tensor  # (C,)
    post_ln_b: torch.Tensor  # (C,)
    fc1_w: torch.Tensor  # (F, C)   dense_h_to_4h
    fc1_b: torch.Tensor  # (F,)
    fc2_w: torch.Tensor  # (C, F)   dense_4h_to_h
    fc2_b: torch.Tensor  # (C,)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LayerWeights:
        return LayerWeights(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )


LAYER_FIELDS = tuple(f.name for f in fields(LayerWeights))
ATTENTION_FIELDS = LAYER_FIELDS[:10]
MLP_FIELDS = LAYER_FIELDS[10:]

# Megatron names (spec §B.2), relative to ``language_model.encoder.layers.{i}.``.
MEGATRON_LAYER = "language_model.encoder.layers.{i}."
MEGATRON_FIELDS = {
    "input_ln_w": "input_layernorm.weight",
    "input_ln_b": "input_layernorm.bias",
    "qkv_w": "self_attention.query_key_value.weight",
    "qkv_b": "self_attention.query_key_value.bias",
    "q_ln_w": "self_attention.q_layernorm.weight",
    "q_ln_b": "self_attention.q_layernorm.bias",
    "k_ln_w": "self_attention.k_layernorm.weight",
    "k_ln_b": "self_attention.k_layernorm.bias",
    "dense_w": "self_attention.dense.weight",
    "dense_b": "self_attention.dense.bias",
    "post_ln_w": "post_attention_layernorm.weight",
    "post_ln_b": "post_attention_layernorm.bias",
    "fc1_w": "mlp.dense_h_to_4h.weight",
    "fc1_b": "mlp.dense_h_to_4h.bias",
    "fc2_w": "mlp.dense_4h_to_h.weight",
    "fc2_b": "mlp.dense_4h_to_h.bias",
}
MEGATRON_GLOBALS = {
    "embed": "language_model.embedding.word_embeddings.weight",
    "final_ln_w": "language_model.encoder.final_layernorm.weight",
    "final_ln_b": "language_model.encoder.final_layernorm.bias",
    "head": "word_embeddings_for_head.weight",
}
INV_FREQ = "self_attention.rotary_emb.inv_freq"


def gather_rows(mt: SourceTensor, ids: Sequence[int]) -> torch.Tensor:
    """Rows ``ids`` of a (possibly vocab-parallel) ``[V, C]`` tensor, reading only those rows: (len(ids), C)."""
    return mt.rows(ids)


class MegatronWeights:
    """The original checkpoint read by Megatron names: the reference's only view of the weights."""

    def __init__(self, ckpt: SourceCheckpoint) -> None:
        self.ckpt = ckpt
        self.hyper = megatron_hyper(ckpt)

    def _get(self, key: str) -> SourceTensor:
        try:
            return self.ckpt.tensors[key]
        except KeyError:
            raise ConfigError(
                f"the checkpoint has no tensor {key}",
                hint="the reference needs every Persimmon tensor (spec §B.2)",
            ) from None

    def key(self, name: str, i: int | None = None) -> str:
        return MEGATRON_GLOBALS[name] if i is None else MEGATRON_LAYER.format(i=i) + MEGATRON_FIELDS[name]

    def tensor(self, name: str, i: int | None = None) -> torch.Tensor:
        return self._get(self.key(name, i)).materialize()

    def layer(self, i: int) -> LayerWeights:
        return LayerWeights(**{f: self.tensor(f, i) for f in LAYER_FIELDS})

    def embedding_rows(self, ids: Sequence[int]) -> torch.Tensor:
        return gather_rows(self._get(MEGATRON_GLOBALS["embed"]), ids)

    def final_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor("final_ln_w"), self.tensor("final_ln_b")

    def head_blocks(self) -> Iterator[torch.Tensor]:
        name = "head" if self.hyper.untied else "embed"
        yield from self._get(MEGATRON_GLOBALS[name]).iter_rows(_HEAD_BLOCK_BYTES)


def rope_theta_from_inv_freq(inv_freq: Sequence[float], rotary_dim: int) -> float:
    """Least-squares ``theta`` from ``inv_freq[j] = theta^(-2j/rd)`` (j >= 1); NaN if it cannot be told."""
    pts = [(-math.log(f) * rotary_dim / (2 * j)) for j, f in enumerate(inv_freq) if j >= 1 and f > 0]
    return math.exp(sum(pts) / len(pts)) if pts else float("nan")


def megatron_hyper(ckpt: SourceCheckpoint) -> Hyper:
    """Hyper-parameters from the shapes and ``ckpt.args`` (ADEPT's CLI defaults where args are silent)."""
    t, args = ckpt.tensors, ckpt.args
    embed = t.get(MEGATRON_GLOBALS["embed"])
    qkv = t.get(MEGATRON_LAYER.format(i=0) + MEGATRON_FIELDS["qkv_w"])
    q_ln = t.get(MEGATRON_LAYER.format(i=0) + MEGATRON_FIELDS["q_ln_w"])
    fc1 = t.get(MEGATRON_LAYER.format(i=0) + MEGATRON_FIELDS["fc1_w"])
    if embed is None or qkv is None or q_ln is None or fc1 is None:
        raise ConfigError(
            "the checkpoint lacks the embedding, or layer 0's query_key_value, q_layernorm or dense_h_to_4h",
            hint="the reference needs a Persimmon checkpoint (spec §B.2)",
        )
    vocab, hidden = embed.shape
    head_dim = q_ln.shape[0]
    heads = qkv.shape[0] // (3 * head_dim)
    layers = 0
    while MEGATRON_LAYER.format(i=layers) + MEGATRON_FIELDS["qkv_w"] in t:
        layers += 1
    sq_relu, sq_name = named_arg(args, "sq_relu")
    if sq_relu is False:
        raise ConfigError(f"{sq_name} is False; the reference implements Persimmon's squared ReLU only")
    origin = []
    inv = t.get(MEGATRON_LAYER.format(i=0) + INV_FREQ)
    stored = tuple(inv.materialize().float().tolist()) if inv is not None else None
    pct, pct_name = named_arg(args, "rotary_pct")
    if pct is not None:  # ADEPT: rotary_ndims = int(head_dim * rotary_pct); Megatron-Core: the same
        rotary_dim, src = int(head_dim * float(pct)), pct_name
    elif stored is not None:
        rotary_dim, src = 2 * len(stored), "the length of the stored inv_freq"
    else:
        raise ConfigError("cannot tell the rotary dimensions: no args.rotary_pct and no stored inv_freq")
    origin.append(("rotary_dim", src))
    base, base_src = named_arg(args, "rotary_emb_base")
    if base is None:  # ADEPT's CLI default, unless the stored inv_freq clearly says otherwise
        est = rope_theta_from_inv_freq(stored, rotary_dim) if stored else ADEPT_ROPE_BASE
        base, base_src = ADEPT_ROPE_BASE, "ADEPT's default 25000"
        if abs(est / ADEPT_ROPE_BASE - 1) > 0.01:
            base, base_src = est, "estimated from the stored inv_freq (no args.rotary_emb_base)"
        log.info("args has no rotary_emb_base; the reference uses %s (%s)", base, base_src)
    origin.append(("rope_theta", base_src))
    # ADEPT computes each layer with its own stored buffer; one base must give all of them (or none stored)
    like = stored if base_src.startswith("estimated") else None
    wrong = stored_inv_freq_problems(t, ckpt.where, float(base), base_src, rotary_dim, like)
    if wrong:
        more = f"; and {len(wrong) - 3} more layer(s)" if len(wrong) > 3 else ""
        raise ConfigError(
            "the checkpoint's stored rotary_emb.inv_freq buffers are not all what one rotary base gives: "
            + "; ".join(wrong[:3])
            + more,
            hint="ADEPT's model computes each layer with the buffer stored for it, and a Persimmon config has "
            "one rope_theta for all layers: no conversion of this checkpoint computes what it computes",
        )
    eps, eps_name = named_arg(args, "layernorm_epsilon")
    origin.append(("eps", eps_name if eps is not None else "ADEPT's default 1e-5"))
    if eps is not None and float(eps) != ADEPT_EPS:
        log.warning(
            "%s = %s; ADEPT's inference code uses 1e-5 whatever the checkpoint says "
            "(spec §B.5); the reference follows the checkpoint",
            eps_name,
            eps,
        )
    return Hyper(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        head_dim=head_dim,
        intermediate_size=fc1.shape[0],
        rotary_dim=rotary_dim,
        rope_theta=float(base if base is not None else ADEPT_ROPE_BASE),
        eps=float(eps if eps is not None else ADEPT_EPS),
        untied=MEGATRON_GLOBALS["head"] in t,
        max_positions=arg(args, "max_position_embeddings") or arg(args, "seq_length"),
        stored_inv_freq=stored,
        origin=tuple(origin),
    )


# ---------------------------------------------------------------- the maths


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Standard LayerNorm over the last axis (mean-centred, weight and bias), not RMSNorm (§F.2)."""
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def inv_freq_fp32(theta: float, rotary_dim: int) -> torch.Tensor:
    """``1 / theta^(2j/rd)``, j < rd/2, computed in fp32 exactly as transformers and Megatron write it."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def rotary_tables(
    T: int, hp: Hyper, mode: str, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape (T, rd) for positions 0..T-1 (§F.4).

    ``hf``: positions and angles in fp32 (transformers). ``adept``: positions, inv_freq and angles in bf16,
    as flash-attn 2.0's ``RotaryEmbedding(pos_idx_in_fp32=False)`` computes them in ADEPT's inference code.
    """
    if mode == "hf":
        pos = torch.arange(T, device=device).float()  # (T,)
        freqs = pos[:, None] * inv_freq_fp32(hp.rope_theta, hp.rotary_dim).to(device)[None, :]  # (T, rd/2)
    elif mode == "adept":
        inv = (
            torch.tensor(hp.stored_inv_freq)
            if hp.stored_inv_freq is not None
            else inv_freq_fp32(hp.rope_theta, hp.rotary_dim)
        ).to(device=device, dtype=torch.bfloat16)
        pos = torch.arange(T, device=device, dtype=torch.bfloat16)  # (T,) bf16: 257 -> 256, ...
        freqs = torch.outer(pos, inv)  # (T, rd/2) rounded to bf16
    else:
        raise ValueError(f"rotary mode {mode!r} is not one of {ROTARY_MODES}")
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, rd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` with pairs (i, i + rd/2): GPT-NeoX style, not interleaved GPT-J."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rd dims of every head; the rest pass through. x: (T, nh, hd), cos/sin: (T, rd)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]  # (T, nh, rd), (T, nh, hd-rd)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, rd)
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)  # (T, nh, hd)


def attention(
    a: torch.Tensor, lw: LayerWeights, hp: Hyper, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Causal self-attention with QK-LayerNorm and partial rotary; a: (T, C) -> (T, C)."""
    T, nh, hd = a.shape[0], hp.num_heads, hp.head_dim
    qkv = F.linear(a, lw.qkv_w, lw.qkv_b)  # (T, nh*3*hd)
    qkv = qkv.view(T, nh, 3 * hd)  # Megatron: [sq, b, np, 3*hn], then split along the last dim
    q, k, v = qkv.split(hd, dim=-1)  # 3 x (T, nh, hd)
    if hp.qk_layernorm:
        q = layer_norm(q, lw.q_ln_w, lw.q_ln_b, hp.eps)  # over hd, per head, shared weights
        k = layer_norm(k, lw.k_ln_w, lw.k_ln_b, hp.eps)
    q, k = partial_rope(q, cos, sin), partial_rope(k, cos, sin)  # (T, nh, hd)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (nh, T, hd)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()  # (T, T)
    y = torch.empty_like(q)  # (nh, T, hd)
    step = max(1, (256 << 20) // max(1, 4 * T * T))  # heads per block: scores stay under ~256 MB
    for h0 in range(0, nh, step):
        s = q[h0 : h0 + step] @ k[h0 : h0 + step].transpose(-2, -1) * hd**-0.5  # (h, T, T)
        s = s.masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32 like HF / Megatron
        y[h0 : h0 + step] = p @ v[h0 : h0 + step]  # (h, T, hd)
    y = y.transpose(0, 1).reshape(T, nh * hd)  # (T, nh*hd) heads concatenated head-major
    return F.linear(y, lw.dense_w, lw.dense_b)  # (T, C)


ACTIVATIONS = {  # Persimmon: relu2 (§F.2); the others only so that a wrong config.json computes wrongly
    "relu2": lambda u: torch.square(F.relu(u)),
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda u: F.gelu(u, approximate="tanh"),
    "gelu_pytorch_tanh": lambda u: F.gelu(u, approximate="tanh"),
    "silu": F.silu,
}


def mlp(m: torch.Tensor, lw: LayerWeights, act: str = "relu2") -> torch.Tensor:
    """``dense_4h_to_h(relu(dense_h_to_4h(m))^2)``; m: (T, C) -> (T, C)."""
    u = F.linear(m, lw.fc1_w, lw.fc1_b)  # (T, F)
    return F.linear(ACTIVATIONS[act](u), lw.fc2_w, lw.fc2_b)  # (T, C) squared ReLU


def decoder_layer(
    h: torch.Tensor, lw: LayerWeights, hp: Hyper, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-LN block; returns the residual stream after attention and after the MLP, both (T, C)."""
    h_mid = h + attention(layer_norm(h, lw.input_ln_w, lw.input_ln_b, hp.eps), lw, hp, cos, sin)
    h_out = h_mid + mlp(layer_norm(h_mid, lw.post_ln_w, lw.post_ln_b, hp.eps), lw, hp.hidden_act)
    return h_mid, h_out
