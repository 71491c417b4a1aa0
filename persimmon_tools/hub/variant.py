"""Base or chat, for the licence and the card: every fact a converted folder records, before asking the user.

The facts, each with where it came from (the card says so):

* the variant ``conversion.json`` / ``verification.json`` record (``source.variant``), decided by the
  release's own name (:mod:`persimmon_tools.megatron.variant`; ``variant_from`` says which name). Older
  records without ``variant_from`` fall back to the release file's own name (never to other words of its
  path: ``chat_experiments/8b_base_model_release.tar`` is a base model);
* the ``--chat`` choice of ``convert``: a ``chat: true`` recorded in ``conversion.json`` (top level or under
  ``tokenizer``), and the chat template for ADEPT's ``human: …\\n\\nadept:`` format that ``convert --chat``
  (and ``tokenizer --chat``) writes into ``tokenizer_config.json``. Leaving out ``--chat`` says nothing:
  a base model is converted without it, and so may be a chat model.

One variant among the facts decides; facts that disagree (a release named base converted with ``--chat``)
decide nothing, and the refusal names them. A ``variant_from`` that says why the name decided nothing
(``unknown: ...``) is final for the names, not for ``--chat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from persimmon_tools.megatron.variant import name_says

_TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class VariantEvidence:
    """``variant``: ``"base"``, ``"chat"`` or ``"unknown"``; ``origin``: where it came from, or why it is
    unknown (a phrase for messages and the card); ``facts``: every ``(variant, where)`` found."""

    variant: str
    origin: str
    facts: tuple[tuple[str, str], ...] = ()

    @property
    def conflicting(self) -> bool:
        return len({v for v, _ in self.facts}) > 1


def _source(record: dict[str, Any] | None) -> dict[str, Any]:
    src = (record or {}).get("source")
    return src if isinstance(src, dict) else {}


def _name_facts(
    conversion: dict[str, Any] | None, verification: dict[str, Any] | None
) -> list[tuple[str, str]]:
    """What the records say the release's name decided (or, for older records, what the name says)."""
    facts: list[tuple[str, str]] = []
    for file, src in (("conversion.json", _source(conversion)), ("verification.json", _source(verification))):
        if src.get("variant") in ("base", "chat"):
            how = src.get("variant_from") or "the release's name"
            facts.append((src["variant"], f"{file} (recorded from {how})"))
    if facts:
        return facts[:1] if len({v for v, _ in facts}) == 1 else facts
    for file, src in (("conversion.json", _source(conversion)), ("verification.json", _source(verification))):
        if src.get("variant_from"):
            continue  # decided from the release's name: unknown is the answer for the names
        name = src.get("name") or PurePosixPath(str(src.get("path") or "")).name
        said = name_says(name) if name else None
        if said in ("base", "chat"):
            return [(said, f"the release name {name!r} recorded in {file}")]
    return []


def _chat_choice(
    conversion: dict[str, Any] | None, tokenizer_config: dict[str, Any] | None
) -> list[tuple[str, str]]:
    """``convert --chat``, as recorded: a ``chat: true`` in conversion.json, or ADEPT's chat template."""
    conv = conversion or {}
    tok = conv.get("tokenizer") if isinstance(conv.get("tokenizer"), dict) else {}
    if conv.get("chat") is True or tok.get("chat") is True:
        return [("chat", "the --chat choice recorded in conversion.json")]
    template = (tokenizer_config or {}).get("chat_template")
    texts = [template] if isinstance(template, str) else []
    if isinstance(template, list):  # transformers also accepts [{"name", "template"}]
        texts = [
            t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)
        ]
    if any("human: " in t and "adept:" in t for t in texts):
        return [
            (
                "chat",
                f"{_TOKENIZER_CONFIG}'s chat template for ADEPT's human:/adept: format (written by convert --chat)",
            )
        ]
    return []


def variant_evidence(
    conversion: dict[str, Any] | None,
    verification: dict[str, Any] | None,
    tokenizer_config: dict[str, Any] | None = None,
) -> VariantEvidence:
    """Base or chat from the folder's records (see the module's docstring), and where that came from."""
    facts = _name_facts(conversion, verification) + _chat_choice(conversion, tokenizer_config)
    variants = {v for v, _ in facts}
    if len(variants) == 1:
        variant = variants.pop()
        return VariantEvidence(variant, " and ".join(where for _, where in facts), tuple(facts))
    if variants:
        said = "; ".join(f"{where} says {v}" for v, where in facts)
        return VariantEvidence("unknown", f"the records disagree: {said}", tuple(facts))
    why = [
        str(src.get("variant_from"))
        for src in (_source(conversion), _source(verification))
        if str(src.get("variant_from") or "").startswith("unknown")
    ]
    reason = why[0].removeprefix("unknown: ") if why else "no record names base or chat"
    return VariantEvidence(
        "unknown",
        f"{reason}; {_TOKENIZER_CONFIG} has no chat template for ADEPT's format (no convert --chat)",
    )


def detect_variant(conversion: dict[str, Any] | None, verification: dict[str, Any] | None) -> str:
    """``"base"``, ``"chat"`` or ``"unknown"`` as the two records say (their variant or release name; see
    :func:`variant_evidence` for every fact a folder holds)."""
    return variant_evidence(conversion, verification).variant
