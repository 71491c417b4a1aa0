"""The generation check: does the converted model continue each prompt greedily as the reference does?

Design (see docs/verify.md, "Generation"):

1. The converted model generates ``N`` new tokens per prompt greedily: ``transformers``' own
   ``generate(do_sample=False)`` when transformers is the loader (what users run), else the toolkit's own
   layer-by-layer loop (:func:`greedy_layerwise`, with a cache of each layer's keys and values, so every
   step reads each converted layer once for all prompts).
2. ONE teacher-forced forward pass over ``prompt + generated`` (the lockstep run of
   :mod:`persimmon_tools.verification.run`, which also gives the logit metrics on the prompt's positions)
   gives the reference's greedy choice at every step given the same prefix. Before the first difference the
   prefixes of both sides are identical, so the first position where the reference's argmax differs from the
   converted model's token is exactly where greedy decoding of the two would part ways. The reference's
   tokens are its argmaxes up to and including that position.
3. Rule: in fp32 the tokens must be identical. In bf16/fp16 a difference fails only when the reference's
   logit gap between its token and the converted model's token at that position exceeds the dtype's max
   |Δ logit| tolerance (``max_rel x scale``, :mod:`persimmon_tools.verification.metrics`): two correct
   implementations whose logits each differ by less than that can only swap tokens that are nearly tied.

Layouts: logits ``(T + n, V)`` per prompt (row ``t`` predicts token ``t + 1``); the new token ``j`` is
predicted by row ``T - 1 + j``. EOS does not stop generation: every prompt gets ``n`` tokens (fewer only
where ``max_position_embeddings`` ends first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from persimmon_tools.verification.reference import LayerWeights, layer_norm, mlp, partial_rope
from persimmon_tools.verification.run import LayerwiseModel
from persimmon_tools.verification.transformers_side import TransformersTrace

log = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = 16


def budget(prompt_lengths: Sequence[int], new_tokens: int, max_positions: int) -> list[int]:
    """New tokens per prompt: ``new_tokens``, fewer where the prompt reaches ``max_positions``."""
    return [max(0, min(new_tokens, max_positions - t)) for t in prompt_lengths]


@torch.no_grad()
def greedy(
    model: TransformersTrace | LayerwiseModel, seqs: Sequence[Sequence[int]], counts: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of ``seqs`` by the converted model: ``counts[s]`` new token ids each."""
    if isinstance(model, TransformersTrace):
        return [greedy_transformers(model, s, n) for s, n in zip(seqs, counts, strict=True)]
    return greedy_layerwise(model, seqs, counts)


def greedy_transformers(trace: TransformersTrace, seq: Sequence[int], n: int) -> list[int]:
    """``n`` new tokens of ``transformers``' ``generate(do_sample=False)``, EOS not stopping it."""
    if n <= 0:
        return []
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    ids = torch.tensor([list(seq)], device=trace.device)  # (1, T)
    out = trace.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [int(t) for t in out[0, len(seq) :].tolist()]  # (n,)


@dataclass
class _Cache:
    """Keys and values of one sequence at one layer so far: (nh, t, hd) each."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


def _attention_cached(
    a: torch.Tensor, lw: LayerWeights, model: LayerwiseModel, cos: torch.Tensor, sin: torch.Tensor, c: _Cache
) -> torch.Tensor:
    """The reference's attention (:func:`~persimmon_tools.verification.reference.attention`) for ``t`` new
    positions after the cached ones; a: (t, C) -> (t, C); cos/sin: (t, rd) for the new positions."""
    hp, t = model.hp, a.shape[0]
    nh, hd = hp.num_heads, hp.head_dim
    q, k, v = F.linear(a, lw.qkv_w, lw.qkv_b).view(t, nh, 3 * hd).split(hd, dim=-1)  # 3 x (t, nh, hd)
    if hp.qk_layernorm:
        q = layer_norm(q, lw.q_ln_w, lw.q_ln_b, hp.eps)
        k = layer_norm(k, lw.k_ln_w, lw.k_ln_b, hp.eps)
    q, k, v = (
        partial_rope(q, cos, sin).transpose(0, 1),
        partial_rope(k, cos, sin).transpose(0, 1),
        v.transpose(0, 1),
    )
    c.k = k if c.k is None else torch.cat([c.k, k], dim=1)  # (nh, S, hd)
    c.v = v if c.v is None else torch.cat([c.v, v], dim=1)
    S = c.k.shape[1]
    causal = torch.ones(t, S, dtype=torch.bool, device=a.device).tril(diagonal=S - t)  # (t, S)
    y = torch.empty_like(q)  # (nh, t, hd)
    step = max(1, (256 << 20) // max(1, 4 * t * S))  # heads per block: scores stay under ~256 MB
    for h0 in range(0, nh, step):
        s = q[h0 : h0 + step] @ c.k[h0 : h0 + step].transpose(-2, -1) * hd**-0.5  # (h, t, S)
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        y[h0 : h0 + step] = p @ c.v[h0 : h0 + step]  # (h, t, hd)
    return F.linear(y.transpose(0, 1).reshape(t, nh * hd), lw.dense_w, lw.dense_b)  # (t, C)


def greedy_layerwise(
    model: LayerwiseModel, seqs: Sequence[Sequence[int]], counts: Sequence[int]
) -> list[list[int]]:
    """Greedy decoding with the toolkit's own layer-by-layer loader: one pass over the layers per new token,
    for all prompts at once (the prompt itself in the first pass), with a key/value cache per layer."""
    hp = model.hp
    out: list[list[int]] = [[] for _ in seqs]
    caches = [[_Cache() for _ in range(hp.num_layers)] for _ in seqs]
    tables = [model.rotary(len(s) + n) for s, n in zip(seqs, counts, strict=True)]  # (T + n, rd) each
    feed = {s: list(seq) for s, (seq, n) in enumerate(zip(seqs, counts, strict=True)) if n > 0}
    done = {s: 0 for s in feed}  # positions already in the cache
    while feed:
        active = sorted(feed)
        hs = model.embed([feed[s] for s in active])  # (t, C) each
        for i in range(hp.num_layers):
            lw = model.load_layer(i)
            for j, s in enumerate(active):
                lo, hi = done[s], done[s] + hs[j].shape[0]
                cos, sin = (x[lo:hi] for x in tables[s])
                h = hs[j]
                h = h + _attention_cached(
                    layer_norm(h, lw.input_ln_w, lw.input_ln_b, hp.eps), lw, model, cos, sin, caches[s][i]
                )
                hs[j] = h + mlp(layer_norm(h, lw.post_ln_w, lw.post_ln_b, hp.eps), lw, hp.hidden_act)
            del lw
        last = model.logits([h[-1:] for h in hs])  # (1, V) each
        for j, s in enumerate(active):
            done[s] += hs[j].shape[0]
            tok = int(last[j][0].float().argmax())
            out[s].append(tok)
            feed[s] = [tok]
            if len(out[s]) == counts[s]:
                del feed[s]
    return out


# ---------------------------------------------------------------- the judgement


@dataclass(frozen=True)
class Choices:
    """The reference's view of the new tokens of one prompt along the teacher-forced sequence.

    ``top[j]``: the reference's argmax for new token ``j``; ``gap(j, b)``: its logit for ``top[j]`` minus its
    logit for ``b`` (a lower bound where only the top-k is known); ``scale``/``tolerance``: the prompt's logit
    scale and max |Δ logit| bound."""

    top: list[int]
    gap: Callable[[int, int], float]
    tolerance: float


def choices_from_logits(ref: torch.Tensor, prompt_len: int, n: int, tolerance: float) -> Choices:
    """Choices from the reference's full logits ``ref`` (T + n, V) of ``prompt + generated``."""
    rows = ref[prompt_len - 1 : prompt_len - 1 + n].float()  # (n, V)
    top = [int(x) for x in rows.argmax(-1).tolist()] if n else []
    return Choices(top, lambda j, b: float(rows[j, top[j]] - rows[j, b]), tolerance)


def judge(name: str, converted: Sequence[int], choices: Choices, exact: bool) -> dict:
    """One prompt's entry of ``verification.json``'s ``generation.prompts``: ``compared`` new tokens (all of
    them against a source; against the stored record, those whose prefix the record holds)."""
    converted = [int(t) for t in converted]
    compared = min(len(choices.top), len(converted))
    first = next((j for j in range(compared) if choices.top[j] != converted[j]), None)
    reference = list(choices.top if first is None else choices.top[: first + 1])
    entry: dict = {"name": name, "new_tokens": len(converted), "compared": compared}
    entry.update(reference=reference, converted=converted, same=first is None and compared == len(converted))
    entry["first_difference"] = None
    passed = first is None
    if first is not None:
        a, b = choices.top[first], converted[first]
        gap = choices.gap(first, b)
        passed = not exact and gap <= choices.tolerance
        entry["first_difference"] = {
            "position": first,
            "reference_token": a,
            "converted_token": b,
            "logit_gap": gap,
            "logit_tolerance": None if exact else choices.tolerance,
        }
    entry["passed"] = passed
    return entry


def rule(tolerance_name: str) -> str:
    """The rule as ``verification.json`` and the table state it."""
    if tolerance_name == "fp32":
        return (
            "fp32: every new token of the converted model's greedy decoding must equal the reference's greedy "
            "choice given the same prefix (one teacher-forced reference pass over prompt + generated tokens)"
        )
    return (
        f"{tolerance_name}: at the first new token where the converted model's greedy choice differs from the "
        "reference's (given the same prefix), the reference's logit gap between its token and the converted "
        f"model's must not exceed the {tolerance_name} max |Δ logit| tolerance (max_rel x the prompt's logit "
        "scale); a larger gap fails"
    )


def generation_record(new_tokens: int, tolerance_name: str, prompts: list[dict]) -> dict:
    """``verification.json``'s ``generation`` object."""
    return {
        "new_tokens": new_tokens,
        "prompts": prompts,
        "verdict": "pass" if all(p["passed"] for p in prompts) else "fail",
        "rule": rule(tolerance_name),
    }


def describe_failure(generation: dict) -> str | None:
    """A sentence for the diagnosis naming the first prompt whose generation failed; None if none did."""
    bad = next((p for p in generation["prompts"] if not p["passed"]), None)
    if bad is None:
        return None
    d = bad["first_difference"] or {}
    bound = "" if d.get("logit_tolerance") is None else f" > tolerance {d['logit_tolerance']:.3g}"
    return (
        f"greedy generation differs: prompt {bad['name']!r} new token {d.get('position')} is "
        f"{d.get('converted_token')} where the reference chooses {d.get('reference_token')} given the same "
        f"prefix (reference logit gap {d.get('logit_gap', float('nan')):.3g}{bound})"
    )
