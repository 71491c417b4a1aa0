"""KL(reference ‖ converted) as a distribution over positions, top-1 agreement and "same top-p".

Per position ``t`` of a prompt (the same positions the logit metrics use: the prompt's own):

* ``KL_t = Σ_v p_v (log p_v − log q_v)``, p = softmax(reference logits), q = softmax(converted), in fp64;
* top-1: the reference's and the converted model's argmax agree;
* same top-p (p = :data:`TOP_P`): the reference's top token lies in the converted model's top-p set, the
  smallest set of its most probable tokens whose mass reaches ``TOP_P``; that is, the converted mass on
  tokens strictly more probable than it is below ``TOP_P``.

Per prompt and over all prompts (``overall``): ``p50``, ``p90``, ``p99`` and ``max`` of ``KL_t``,
``top1_agreement`` and ``same_top_p`` (shares of positions). Against the stored reference record
(:mod:`persimmon_tools.verification.record`) only the reference's top-k logits and log-sum-exp are known:
the tail beyond the top-k is one bucket on both sides, which gives a lower bound of ``KL_t`` (the
log-sum inequality), equal to it when the reference's tail holds no mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_P = 0.9
_BLOCK = 32  # positions at a time: (32, V) fp64 blocks


@dataclass(frozen=True)
class PositionStats:
    """Per position of one prompt, on the CPU: KL (T,) fp64, same argmax (T,) bool, reference top in the
    converted top-p (T,) bool."""

    kl: torch.Tensor
    top1: torch.Tensor
    top_p: torch.Tensor


def _in_top_p(logq: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """logq (t, V) log-probabilities, token (t,): is ``token`` inside the top-:data:`TOP_P` set?"""
    q = logq.exp()  # (t, V)
    mine = q.gather(-1, token[:, None])  # (t, 1)
    return (q * (q > mine)).sum(-1) < TOP_P  # (t,)


def full_stats(ref: torch.Tensor, conv: torch.Tensor) -> PositionStats:
    """From both sides' full logits, (T, V) each."""
    kl, top1, top_p = [], [], []
    for a in range(0, ref.shape[0], _BLOCK):
        logp = torch.log_softmax(ref[a : a + _BLOCK].double(), -1)  # (t, V)
        logq = torch.log_softmax(conv[a : a + _BLOCK].double(), -1)
        kl.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0))
        top = logp.argmax(-1)  # (t,)
        top1.append(top == logq.argmax(-1))
        top_p.append(_in_top_p(logq, top))
    return PositionStats(torch.cat(kl).cpu(), torch.cat(top1).cpu(), torch.cat(top_p).cpu())


def topk_stats(
    values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, conv: torch.Tensor
) -> PositionStats:
    """From the reference's top-k ``values``/``indices`` (T, k) and log-sum-exp ``lse`` (T,), and the converted
    model's full logits ``conv`` (T, V); KL is the top-k-plus-tail lower bound (module docstring)."""
    kl, top1, top_p = [], [], []
    for a in range(0, conv.shape[0], _BLOCK):
        idx = indices[a : a + _BLOCK].long()  # (t, k)
        logp = values[a : a + _BLOCK].double() - lse[a : a + _BLOCK].double()[:, None]  # (t, k)
        logq_all = torch.log_softmax(conv[a : a + _BLOCK].double(), -1)  # (t, V)
        logq = logq_all.gather(-1, idx)  # (t, k)
        p, q = logp.exp(), logq.exp()
        p_tail = (1 - p.sum(-1)).clamp_min(0)  # (t,)
        q_tail = (1 - q.sum(-1)).clamp_min(1e-300)
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0.0)
        kl.append(((p * (logp - logq)).sum(-1) + tail).clamp_min(0))
        top1.append(idx[:, 0] == logq_all.argmax(-1))
        top_p.append(_in_top_p(logq_all, idx[:, 0]))
    return PositionStats(torch.cat(kl).cpu(), torch.cat(top1).cpu(), torch.cat(top_p).cpu())


def summarize(stats: list[PositionStats]) -> dict[str, float | int]:
    """``positions``, ``p50``, ``p90``, ``p99``, ``max`` of KL, ``top1_agreement``, ``same_top_p``."""
    kl = torch.cat([s.kl for s in stats]) if stats else torch.zeros(0, dtype=torch.float64)
    if not kl.numel():
        return {"positions": 0}
    qs = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "positions": int(kl.numel()),
        "p50": qs[0],
        "p90": qs[1],
        "p99": qs[2],
        "max": float(kl.max()),
        "top1_agreement": float(torch.cat([s.top1 for s in stats]).double().mean()),
        "same_top_p": float(torch.cat([s.top_p for s in stats]).double().mean()),
    }


def kl_record(names: list[str], stats: list[PositionStats], *, bound: float, exact: bool) -> dict:
    """``verification.json``'s ``kl`` object: ``overall`` and ``prompts`` (each with its ``name``)."""
    return {
        "top_p": TOP_P,
        "exact": exact,
        "how": "KL(softmax(reference) || softmax(converted)) per position over the whole vocabulary, fp64"
        if exact
        else "lower bound from the stored reference top-k and log-sum-exp (the tail beyond the top-k as one "
        "bucket), fp64",
        "bound": bound,
        "bound_applies_to": "each prompt's mean KL (metrics[].kl_div); the distribution is reported",
        "overall": summarize(stats),
        "prompts": [{"name": n, **summarize([s])} for n, s in zip(names, stats, strict=True)],
    }
