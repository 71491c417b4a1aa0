"""Prompts for ``verify``: a default set plus user prompts, tokenized with the converted folder's tokenizer.

Tokenizer, first that works: ``tokenizer.json`` through ``transformers.AutoTokenizer`` (or ``tokenizers``
when transformers is absent), then ``tokenizer.model`` through sentencepiece (BOS ``|ENDOFTEXT|``
prepended when ``tokenizer_config.json`` says ``add_bos_token``, the HF convention, spec §G), then fixed
pseudo-random ids. Ids at or above the model's vocabulary rows are refused, never clamped.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from persimmon_tools.errors import UsageError, VerificationError
from persimmon_tools.safe_read import (
    MAX_PROMPTS_BYTES,
    MAX_VOCAB_BYTES,
    open_regular,
    parse_json,
    read_json,
    read_text,
)
from persimmon_tools.tokenizer.spm import ENDOFTEXT

log = logging.getLogger(__name__)

LONG_MIN_TOKENS = 257  # the default set holds one prompt longer than 256 tokens (bf16 positions >= 256)
_PARAGRAPHS = (
    "Persimmon-8B is a decoder-only transformer with rotary position embeddings applied to half of each "
    "attention head, layer normalisation of queries and keys, and a squared ReLU in its feed-forward "
    "blocks. It was trained with a context of sixteen thousand tokens, and its vocabulary of a quarter "
    "of a million entries leaves room for image patches and other modalities.",
    "To check a conversion, run the original weights and the converted ones on the same text and compare "
    "every logit at every position. A swapped tensor, a reordered projection or a wrong rotary base all "
    "show up as differences far larger than rounding, and the first layer where the hidden states part "
    "ways points at the culprit.",
    "Zürich, Москва, 東京, القاهرة and São Paulo are cities; 3.14159, 2.71828 and 1.41421 are "
    "numbers; "
    "def f(x):\n    return x * x\n is a function. The quick brown fox jumps over the lazy dog, again and "
    "again, while the checkpoint streams from disk one layer at a time.",
)
DEFAULT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("plain", "The capital of France is Paris, and the capital of Germany is"),
    ("chat", "human: Simply put, the theory of relativity states that?\n\nadept:"),
    ("code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
)


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str | None  # None for --ids
    ids: tuple[int, ...]

    @property
    def label(self) -> str:
        return self.text if self.text is not None else "ids:" + ",".join(map(str, self.ids))


def _sentencepiece(folder: Path) -> tuple[Callable[[str], list[int]], str] | None:
    path = folder / "tokenizer.model"
    if not os.path.lexists(path):
        return None
    from persimmon_tools.tokenizer.spm import load_sp

    sp = load_sp(path, follow_symlinks=False)
    cfg_path = folder / "tokenizer_config.json"
    add_bos = True
    if os.path.lexists(cfg_path):
        cfg = read_json(cfg_path, what="tokenizer config", error=VerificationError, follow_symlinks=False)
        add_bos = bool(cfg.get("add_bos_token", True))
    bos = sp.piece_to_id(ENDOFTEXT)
    bos = bos if sp.id_to_piece(bos) == ENDOFTEXT else None
    prefix = [bos] if add_bos and bos is not None else []
    return (lambda text: prefix + list(sp.encode(text))), "sentencepiece (tokenizer.model)" + (
        f", BOS {bos} prepended" if prefix else ""
    )


#: Files a tokenizer library may open in a converted folder: each must be a regular file, not a link.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def _check_tokenizer_files(folder: Path) -> None:
    """Refuse links, FIFOs, devices and oversized files among :data:`TOKENIZER_FILES` before a library that
    opens them blindly (and would block on a FIFO) gets the folder."""
    for name in TOKENIZER_FILES:
        if os.path.lexists(folder / name):
            what = f"tokenizer file {name}"
            with open_regular(
                folder / name,
                what=what,
                max_bytes=MAX_VOCAB_BYTES,
                follow_symlinks=False,
                error=VerificationError,
            ):
                pass


def load_tokenizer(folder: Path) -> tuple[Callable[[str], list[int]] | None, str]:
    """``(encode, description)``; encode is None when the folder has no usable tokenizer."""
    folder = Path(folder)
    notes = []
    _check_tokenizer_files(folder)
    if (folder / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
            return (
                lambda text: list(tok(text)["input_ids"])
            ), f"transformers AutoTokenizer ({type(tok).__name__})"
        except ImportError:
            try:
                from tokenizers import Tokenizer

                tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
                return (lambda text: list(tk.encode(text).ids)), "tokenizers (tokenizer.json)"
            except Exception as err:  # a damaged tokenizer.json: fall back, and say so
                notes.append(f"tokenizer.json unusable: {err}")
        except Exception as err:
            notes.append(f"AutoTokenizer failed: {type(err).__name__}: {err}")
    spm = _sentencepiece(folder)
    if spm is not None:
        encode, desc = spm
        return encode, "; ".join([desc, *notes])
    return None, "; ".join(["no tokenizer in the folder: fixed pseudo-random ids", *notes])


def _fixed_ids(n: int, vocab: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(vocab) for _ in range(n))


def read_prompts_file(path: Path) -> list[str]:
    """``.json``: a list of strings; otherwise one prompt per line with ``\\n``/``\\t`` escapes."""
    path = Path(path)
    hint = "pass a UTF-8 text file (one prompt per line) or a .json list of strings"
    text = read_text(path, what="--prompts-file", max_bytes=MAX_PROMPTS_BYTES, error=UsageError, hint=hint)
    if path.suffix == ".json":
        data = parse_json(text, origin=f"{path} (--prompts-file)", error=UsageError, expect=list, hint=hint)
        if not all(isinstance(x, str) for x in data):
            raise UsageError(f"{path} must hold a JSON list of strings", hint=hint)
        return data
    return [line.replace("\\n", "\n").replace("\\t", "\t") for line in text.splitlines() if line.strip()]


def build_prompts(
    folder: Path,
    *,
    texts: Sequence[str] = (),
    ids: Sequence[Sequence[int]] = (),
    defaults: bool = True,
    vocab: int,
    max_tokens: int,
) -> tuple[list[Prompt], str]:
    """Tokenized prompts (defaults first) and a description of the tokenizer used."""
    encode, desc = load_tokenizer(folder)
    out: list[Prompt] = []

    def add_text(name: str, text: str, fallback_len: int) -> None:
        toks = encode(text) if encode else list(_fixed_ids(fallback_len, vocab, len(out)))
        out.append(Prompt(name, text if encode else None, tuple(toks)))

    if defaults:
        for name, text in DEFAULT_PROMPTS:
            add_text(name, text, 24)
        long_text, n = _PARAGRAPHS[0], 0
        while encode and len(encode(long_text)) < LONG_MIN_TOKENS and n < 32:
            n += 1
            long_text += "\n\n" + _PARAGRAPHS[n % len(_PARAGRAPHS)]
        add_text("long", long_text, 300)
    for k, text in enumerate(texts):
        if encode is None:
            raise UsageError(
                "--prompt needs a tokenizer, and the folder has none (tokenizer.json/.model)",
                hint="pass token ids with --ids instead",
            )
        add_text(f"prompt{k + 1}", text, 0)
    for k, seq in enumerate(ids):
        out.append(Prompt(f"ids{k + 1}", None, tuple(int(i) for i in seq)))
    if not out:
        raise UsageError("no prompts to verify with", hint="drop --no-default-prompts or pass --prompt/--ids")
    checked = []
    for p in out:
        if not p.ids:
            raise UsageError(f"prompt {p.name} ({p.label[:40]!r}) tokenizes to no tokens")
        bad = [i for i in p.ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(
                f"prompt {p.name} holds token id(s) {bad[:5]} outside the model's {vocab} rows",
                hint="the tokenizer does not belong to this model, or --ids is wrong",
            )
        if len(p.ids) > max_tokens:
            log.warning("prompt %s has %d tokens; verifying the first %d", p.name, len(p.ids), max_tokens)
            p = Prompt(p.name, p.text, p.ids[:max_tokens])
        checked.append(p)
    return checked, desc
