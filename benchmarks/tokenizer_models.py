"""Parity of the fast tokenizer with SentencePiece over many models and corpora, as one table.

    python benchmarks/tokenizer_models.py MODEL.model [MODEL.model ...] --corpus natural=a.txt --corpus runs=b.txt

Each cell is ``encode mismatches (float32 ties among them) / decode mismatches`` over the corpus (one text per
line), or why the model is refused. ``--runs`` adds a generated corpus of repeated characters and words
(``....``, ``!!!!``, ``haha``), where float32 ties show up (docs/tokenizer.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.proto import BPE, read_spm
from persimmon_tools.tokenizer.write import check_parity

RUN_UNITS = list(".!-=_~*#0123456789xaeAE") + [
    "\u2026",
    "\u30fc",
    "ab",
    "ha",
    "la",
    "12",
    "-=",
    " ",
    "\t",
    "  a",
]


def runs_corpus() -> list[str]:
    """Repeated characters and short units, 2 to 40 times."""
    return [unit * n for unit in RUN_UNITS for n in range(2, 41)]


def describe(model: Path) -> str:
    info = read_spm(model)
    kind = "BPE" if info.model_type == BPE else "Unigram"
    norm = "charsmap" if info.charsmap else "identity"
    return f"{kind}, {len(info.pieces):,} pieces, {'byte fallback' if info.byte_fallback else 'no byte fallback'}, {norm}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--corpus", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--runs", action="store_true", help="add the generated corpus of repeated characters")
    a = ap.parse_args()
    corpora: dict[str, list[str]] = {}
    for spec in a.corpus:
        name, _, file = spec.partition("=")
        corpora[name] = Path(file).read_text(encoding="utf-8").split("\n")
    if a.runs:
        corpora["runs"] = runs_corpus()
    print("| model | kind | " + " | ".join(f"{k} ({len(v):,})" for k, v in corpora.items()) + " |")
    print("|---|---|" + "---|" * len(corpora))
    started = time.perf_counter()
    for model in a.models:
        cells = []
        for texts in corpora.values():
            try:
                r = check_parity(model, texts)
            except TokenizerError as err:
                why = err.message.split("because ", 1)[-1].split(": literal", 1)[0]
                cells = [f"refused: {why[:150]}"] + [""] * (len(corpora) - 1)
                break
            cells.append(f"{r.encode_mismatches} ({r.tie_mismatches} ties) / {r.decode_mismatches}")
        print(f"| {model.name} | {describe(model)} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{len(a.models)} models in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
