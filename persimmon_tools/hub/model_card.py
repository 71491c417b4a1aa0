"""The model card (``README.md``) that ``push`` publishes with a converted folder.

Built from the folder's own records, never from guesses: ``conversion.json`` (what was converted, from which
release file, iteration, TP/PP, dtype, tool version, the tokenizer fingerprint) and ``verification.json``
(verdict, settings, metrics, the sha256 of every file and, since 2026-12-07, the environment and the
per-check table: :mod:`persimmon_tools.hub.card_checks`, which also says how to re-check a downloaded copy).
Missing or partial records render as "unknown" or "not recorded" rather than failing.

Licence by variant (spec §A, §H.14): ADEPT's README releases the base model under Apache-2.0 and the chat
model under CC-BY-NC-4.0 (the chat card on the Hub says apache-2.0; we follow ADEPT's README). Both can be
overridden with ``license=``. The variant comes from every recorded fact (:mod:`persimmon_tools.hub.variant`:
the recorded variant or release name, and ``convert --chat``), and the card says which. The card carries no push-time data, so the same folder always gives the same
card and a re-run of ``push`` sees it as unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import CONVERSION_FILE, VERIFICATION_FILE, fingerprint_folder
from persimmon_tools.errors import UsageError
from persimmon_tools.hub.card_checks import (
    NOT_RECORDED,
    checks_lines,
    environment_lines,
    fingerprint_text,
    recheck_lines,
    reference_record,
)
from persimmon_tools.hub.records import read_record
from persimmon_tools.hub.variant import VariantEvidence, detect_variant, variant_evidence
from persimmon_tools.safe_read import format_size

logger = logging.getLogger(__name__)

__all__ = ["build_model_card", "detect_variant", "folder_variant", "folder_digest", "read_record"]

DEFAULT_LICENSES = {"base": "apache-2.0", "chat": "cc-by-nc-4.0"}
BASE_MODELS = {"base": "adept/persimmon-8b-base", "chat": "adept/persimmon-8b-chat"}
CHAT_EXAMPLE = "human: Simply put, the theory of relativity states that?\n\nadept:"
_BASE_EXAMPLE = "The capital of France is"


def folder_variant(folder: Path) -> VariantEvidence:
    """Base or chat from every record of ``folder`` (:func:`~persimmon_tools.hub.variant.variant_evidence`:
    the recorded variant or release name, and ``convert --chat``), with where it came from."""
    return variant_evidence(
        read_record(folder, CONVERSION_FILE),
        read_record(folder, VERIFICATION_FILE),
        read_record(folder, "tokenizer_config.json"),
    )


def folder_digest(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 over the sorted ``{path: {sha256, size}}`` fingerprint: names the exact set of files."""
    canonical = json.dumps({k: [v.get("sha256"), v.get("size")] for k, v in sorted(files.items())})
    return hashlib.sha256(canonical.encode()).hexdigest()


def _cell(value: Any, limit: int = 48) -> str:
    """A Markdown table cell: no newlines or pipes, shortened."""
    text = "unknown" if value is None else str(value)
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: Any, fmt: str = ".3g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _provenance(conv: dict[str, Any], ver: dict[str, Any], files: dict[str, dict[str, Any]]) -> list[str]:
    src = conv.get("source") or {}
    vsrc = ver.get("source") or {}
    rows = [
        ("Source file", src.get("name") or vsrc.get("path") or src.get("path")),
        ("Source kind", src.get("kind")),
        ("Iteration", src.get("iteration", vsrc.get("iteration"))),
        ("Tensor parallel (TP)", src.get("tp", vsrc.get("tp"))),
        ("Pipeline parallel (PP)", src.get("pp", vsrc.get("pp"))),
        ("Weights dtype", conv.get("dtype")),
        ("Tokenizer parity with SentencePiece", (conv.get("tokenizer") or {}).get("parity")),
        ("Tokenizer fingerprint", fingerprint_text(conv) or NOT_RECORDED),
        (
            "Parameters",
            f"{conv['num_parameters']:,}" if isinstance(conv.get("num_parameters"), int) else None,
        ),
        ("Converted by", f"persimmon-tools {conv.get('tool_version') or 'unknown'}"),
        ("Converted on", conv.get("created")),
        ("Folder fingerprint", f"`sha256:{folder_digest(files)}`" if files else None),
        ("Card written by", f"persimmon-tools {__version__}"),
    ]
    lines = ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v, 90)} |" for k, v in rows]
    checkpoint = vsrc.get("files") or src.get("checkpoint_files") or []
    if checkpoint:
        lines += ["", "Source checkpoint files:", "", "| file | size | sha256 |", "|---|---|---|"]
        for f in checkpoint:
            sha = f"`{f['sha256']}`" if f.get("sha256") else "not recorded"
            lines.append(f"| {_cell(f.get('name'), 90)} | {format_size(f.get('size'))} | {sha} |")
    lines += [
        "",
        "The folder fingerprint is the sha256 of the sorted list of (file, sha256, size) of every pushed file "
        "except `README.md` and `verification.json`; for a verified folder, the list `verification.json` records.",
    ]
    if files:
        lines += [
            "",
            "<details><summary>Files and sha256</summary>",
            "",
            "| file | size | sha256 |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {format_size(v.get('size'))} | `{v.get('sha256')}` |" for k, v in sorted(files.items())
        ]
        lines += ["", "</details>"]
    return lines


def _verification(ver: dict[str, Any], verified: bool, reason: str | None) -> list[str]:
    lines = ["## Verification", ""]
    if not verified:
        lines += [
            "> **Unverified.** This upload was published with `--allow-unverified`: "
            + (reason or "no passing verification matched these files.")
            + " Do not rely on it producing the same outputs as ADEPT's release.",
            "",
        ]
    if not ver:
        lines.append("No verification report (`verification.json`) was found.")
        return lines
    tol = ver.get("tolerances") or {}
    lines += [
        f"Verdict: **{ver.get('verdict', 'unknown')}**: the converted model (loaded with "
        f"`{ver.get('converted_loader', 'unknown')}`) compared with an independent reference forward pass on the "
        f"original Megatron tensors; device `{ver.get('device', 'unknown')}`, dtype `{ver.get('dtype', 'unknown')}`, "
        f"rotary convention `{ver.get('rotary', 'unknown')}`; tolerances ({tol.get('name', 'unknown')}): "
        f"max |Δlogit| ≤ {_num(tol.get('max_rel'))} and mean |Δlogit| ≤ {_num(tol.get('mean_rel'))} of the "
        f"prompt's logit scale, KL ≤ {_num(tol.get('kl'))}.",
        "",
    ]
    metrics = [m for m in ver.get("metrics") or [] if isinstance(m, dict)]
    if metrics:
        lines += [
            "| prompt | tokens | max abs diff | mean abs diff | KL | top-1 | top-5 | passed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in metrics:
            passed = {True: "yes", False: "**no**"}.get(m.get("passed"), "—")
            lines.append(
                f"| {_cell(m.get('prompt'), 40)} | {_num(m.get('tokens'), 'd')} | {_num(m.get('max_abs_diff'))} "
                f"| {_num(m.get('mean_abs_diff'))} | {_num(m.get('kl_div'))} | {_num(m.get('top1_agreement'))} "
                f"| {_num(m.get('top5_agreement'))} | {passed} |"
            )
    return lines + [""] + environment_lines(ver) + [""] + checks_lines(ver)


def _usage(repo_id: str, variant: str, add_bos: object) -> list[str]:
    prompt = CHAT_EXAMPLE if variant == "chat" else _BASE_EXAMPLE
    lines = [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype=torch.bfloat16)  # torch_dtype= before 4.56',
        "",
        f"prompt = {json.dumps(prompt)}",
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
    ]
    if variant == "chat":
        lines += [
            "",
            "### Chat prompt format",
            "",
            "ADEPT's chat model expects this format (ADEPT's README); a single turn:",
            "",
            "```text",
            "human: {prompt}",
            "",
            "adept:",
            "```",
            "",
            "and several turns:",
            "",
            "```text",
            "human: {prompt}",
            "",
            "adept: {output}",
            "",
            "human: {follow_up}",
            "",
            "adept:",
            "```",
        ]
        if add_bos is True:
            lines += [
                "",
                "This tokenizer prepends `|ENDOFTEXT|` as BOS (`add_bos_token: true`); ADEPT's own "
                "server adds no BOS by default.",
            ]
        elif add_bos is False:
            lines += ["", "This tokenizer adds no BOS (`add_bos_token: false`), like ADEPT's own server."]
    return lines


_CAVEATS = [
    "## Known caveats",
    "",
    "- **Rotary precision.** ADEPT's inference code computes the rotary angles in bfloat16 (bf16 positions "
    "and inverse frequencies); transformers' `PersimmonForCausalLM` computes them in float32. The weights "
    "here are unchanged, but outputs differ from ADEPT's original server, more so at later positions "
    "(angle differences of about 0.1 rad by position 64 and unrelated angles beyond ~1000 tokens).",
    "- **float16.** Fine-tuning in float16 is known to produce NaNs (transformers documentation) and "
    "float16 logits can overflow; use bfloat16 or float32.",
]


def build_model_card(
    folder: Path,
    repo_id: str,
    *,
    license: str | None = None,  # noqa: A002 - the Hub's metadata key and the CLI flag are both "license"
    verified: bool = True,
    unverified_reason: str | None = None,
    files: dict[str, dict[str, Any]] | None = None,
) -> ModelCard:
    """Build the ``README.md`` for a converted folder.

    Args:
        folder: The converted folder (reads ``conversion.json`` and ``verification.json`` if present).
        repo_id: Where it will be published (used in the usage snippet and title).
        license: Hub licence id; default by variant (base ``apache-2.0``, chat ``cc-by-nc-4.0``).
        verified: ``False`` adds a prominent "unverified" notice and the ``unverified`` tag.
        unverified_reason: Why it is unverified (shown in the notice).
        files: ``{path: {sha256, size}}`` of the folder if already computed (else taken from
            ``verification.json`` or computed).

    Returns:
        A ``huggingface_hub.ModelCard``; ``str(card)`` is the file content.

    Raises:
        UsageError: the variant is unknown and no ``license`` was given.

    Example:
        >>> card = build_model_card(Path("persimmon-8b-chat-hf"), "me/persimmon-8b-chat")  # doctest: +SKIP
        >>> card.data.license  # doctest: +SKIP
        'cc-by-nc-4.0'
    """
    folder = Path(folder)
    conv = read_record(folder, CONVERSION_FILE) or {}
    ver = read_record(folder, VERIFICATION_FILE) or {}
    evidence = folder_variant(folder)
    variant = evidence.variant
    if license is None and variant not in DEFAULT_LICENSES:
        raise UsageError(
            f"cannot tell whether {folder} holds the base or the chat model, so the licence is unknown: "
            f"{evidence.origin}",
            hint="pass --license apache-2.0 (base) or --license cc-by-nc-4.0 (chat), as ADEPT's README states",
        )
    chosen = f"`{license}`, set with --license" if license else None
    license = license or DEFAULT_LICENSES[variant]
    if files is None:
        recorded = ver.get("files")
        files = recorded if isinstance(recorded, dict) and recorded else fingerprint_folder(folder)
    tags = ["persimmon", "adept", "persimmon-tools", "safetensors", "text-generation"]
    tags += ["chat"] if variant == "chat" else []
    tags += [] if verified else ["unverified"]
    data = ModelCardData(
        license=license,
        base_model=BASE_MODELS.get(variant),
        tags=tags,
        pipeline_tag="text-generation",
        library_name="transformers",
        language=["en"],
    )
    title = {"base": "Persimmon-8B Base", "chat": "Persimmon-8B Chat"}.get(variant, "Persimmon-8B")
    src_name = (conv.get("source") or {}).get("name") or "ADEPT's Megatron release"
    licence_note = {
        "apache-2.0": "Apache-2.0, as ADEPT's README states for the base model.",
        "cc-by-nc-4.0": "CC-BY-NC-4.0 (non-commercial), as ADEPT's README states for the chat model "
        "(the chat model card on the Hub says apache-2.0; ADEPT's README is followed here).",
    }.get(license, f"`{license}` (set by the uploader).")
    body = [
        f"# {title} ({repo_id.split('/')[-1]})",
        "",
        f"ADEPT's {title}, converted from the original Megatron checkpoint (`{_cell(src_name, 90)}`) to the "
        "Hugging Face `transformers` format (`PersimmonForCausalLM`, safetensors) by "
        "[persimmon-tools](https://pypi.org/project/persimmon-tools/). The weights are ADEPT's, unchanged "
        "apart from the format"
        + (" and the dtype" if conv.get("dtype") not in (None, "bfloat16") else "")
        + ".",
    ]
    if not verified:
        body += ["", "> **Unverified upload**: see [Verification](#verification)."]
    said = (
        f"**{variant}**, from {evidence.origin}" if variant != "unknown" else f"unknown ({evidence.origin})"
    )
    body += [
        "",
        "## Licence",
        "",
        licence_note,
        "",
        f"Variant: {said}" + (f"; licence {chosen}." if chosen else "."),
    ]
    body += [""]
    body += _provenance(conv, ver, files) + [""]
    body += _verification(ver, verified, unverified_reason) + [""]
    body += recheck_lines(repo_id, conv, ver, reference_record(files)) + [""]
    add_bos = (read_record(folder, "tokenizer_config.json") or {}).get("add_bos_token")
    body += _usage(repo_id, variant, add_bos) + [""]
    body += _CAVEATS
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
