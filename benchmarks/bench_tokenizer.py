"""Benchmark: convert a 262,144-piece Unigram byte-fallback model (Persimmon's size) and encode with it.

Side by side in one run: persimmon-tools' ``build_fast_tokenizer`` vs transformers' ``LlamaConverter``
(conversion time and peak RSS, each in a fresh subprocess), then encode throughput of sentencepiece vs the
fast tokenizer on the test corpus. The model is the real 42,782-piece model from ../shared/data padded with
synthetic NORMAL pieces to 262,144 (or any model passed with --model). ``--nmt-nfkc`` gives the padded
model SentencePiece's default ``nmt_nfkc`` normalizer (the charsmap of the bundled tiny vocabulary), which
adds the exact charsmap pipeline to the fast tokenizer; its encode speed is then also shown with
tokenizers' own, approximate ``Precompiled`` normalizer, and the parity of both on the corpus.

    python benchmarks/bench_tokenizer.py [--model PATH] [--nmt-nfkc] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "cc100_ja40K_en10K.symbolRemoved.vocab.reestimated.model"
CORPUS = REPO / "tests" / "data" / "tokenizer_corpus.txt"
TARGET = 262_144


def make_big_model(src: Path, dst: Path, size: int = TARGET, *, nmt_nfkc: bool = False) -> Path:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    if nmt_nfkc:
        tiny = pb.ModelProto()
        tiny.ParseFromString((REPO / "persimmon_tools" / "data" / "tiny_vocab.model").read_bytes())
        proto.normalizer_spec.name = tiny.normalizer_spec.name
        proto.normalizer_spec.precompiled_charsmap = tiny.normalizer_spec.precompiled_charsmap
    have = {p.piece for p in proto.pieces}
    chars = sorted({c for p in have for c in p if c.isprintable()})
    rng = random.Random(0)
    low = min(p.score for p in proto.pieces if p.type == 1)
    while len(proto.pieces) < size:
        piece = ("\u2581" if rng.random() < 0.5 else "") + "".join(
            rng.choice(chars) for _ in range(rng.randint(2, 8))
        )
        if piece in have:
            continue
        have.add(piece)
        proto.pieces.add(piece=piece, score=low - 1 - rng.random() * 5, type=1)
    dst.write_bytes(proto.SerializeToString())
    return dst


_CHILD = r"""
import json, resource, sys, time
kind, model = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if kind == "persimmon-tools":
    from persimmon_tools.tokenizer.write import build_fast_tokenizer
    tok = build_fast_tokenizer(model)
else:
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import LlamaConverter
    class Slow:  # what LlamaConverter reads from a slow LlamaTokenizer
        vocab_file = model
        add_prefix_space = True
        legacy = True
        def __init__(self):
            self.sp_model = spm.SentencePieceProcessor(model_file=model)
        def convert_ids_to_tokens(self, i):
            return self.sp_model.id_to_piece(i)
    tok = LlamaConverter(Slow()).converted()
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def convert_in_child(kind: str, model: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(model)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="SentencePiece model (default: the real one padded to 262,144)"
    )
    parser.add_argument(
        "--nmt-nfkc", action="store_true", help="give the padded model the nmt_nfkc normalizer"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import sentencepiece as spm

    from persimmon_tools.tokenizer.write import build_fast_tokenizer, check_parity

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_big_model(REAL, Path(tmp) / "big.model", nmt_nfkc=args.nmt_nfkc)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        name = model.name if args.model else "real model padded" + (", nmt_nfkc" if args.nmt_nfkc else "")
        print(f"model: {name} ({sp.get_piece_size():,} pieces)")
        print(f"| converter | seconds (best of {args.repeat}) | peak RSS MB |")
        print("|---|---|---|")
        for kind in ("persimmon-tools", "transformers LlamaConverter"):
            runs = [convert_in_child(kind, model) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            print(f"| {kind} | {best['seconds']:.2f} | {max(r['peak_rss_mb'] for r in runs):.0f} |")
        texts = [t for t in CORPUS.read_text(encoding="utf-8").split("\n") if t] * 200
        fast = build_fast_tokenizer(model)
        chars = sum(len(t) for t in texts)
        print(f"\nencode {len(texts):,} texts ({chars:,} chars), best of {args.repeat}:")
        print("| encoder | seconds | texts/s |")
        print("|---|---|---|")
        timings = {
            "sentencepiece encode (loop)": lambda: [sp.encode(t) for t in texts],
            "sentencepiece encode (batch, 2 threads)": lambda: sp.encode(texts, num_threads=2),
            "fast encode (loop)": lambda: [fast.encode(t, add_special_tokens=False) for t in texts],
            "fast encode_batch (2 threads)": lambda: fast.encode_batch(texts, add_special_tokens=False),
        }
        approximate = _approximate(model)
        if approximate is not None:
            timings["fast encode (loop), tokenizers' Precompiled instead"] = lambda: [
                approximate.encode(t, add_special_tokens=False) for t in texts
            ]
        for name, fn in timings.items():
            best = min(_time(fn) for _ in range(args.repeat))
            print(f"| {name} | {best:.3f} | {len(texts) / best:,.0f} |")
        sample = texts[: len(texts) // 200]
        report = check_parity(model, sample)
        print(
            f"\nparity on the corpus ({len(sample)} texts): {report.encode_mismatches} encode, "
            f"{report.decode_mismatches} decode mismatches"
        )
        if approximate is not None:
            wrong = sum(approximate.encode(t, add_special_tokens=False).ids != sp.encode(t) for t in sample)
            print(f"with tokenizers' Precompiled normalizer instead: {wrong} encode mismatches")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def _approximate(model: Path):
    """What ``--force`` writes when the exact charsmap is refused: tokenizers' own grapheme-wise Precompiled
    normalizer (None: the model has no charsmap)."""
    import persimmon_tools.tokenizer.build as build
    from persimmon_tools.errors import TokenizerError
    from persimmon_tools.tokenizer.proto import read_spm

    if not read_spm(model).charsmap:
        return None

    def refuse(*args):
        raise TokenizerError("exact charsmap switched off for the comparison")

    exact = build.exact_charsmap_steps
    build.exact_charsmap_steps = refuse
    try:
        return build.build_fast_tokenizer(model, strict=False)
    finally:
        build.exact_charsmap_steps = exact


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
