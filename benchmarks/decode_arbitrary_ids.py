"""Decode parity on arbitrary id sequences (what a model generates), SentencePiece vs our fast tokenizer.

    python benchmarks/decode_arbitrary_ids.py MODEL.model

Three sets: random mixes of byte pieces and other pieces; texts cut in the middle of a character (as
``max_new_tokens`` may cut them); a byte-piece newline before a cut character. Prints how many decode
differently and the first example. Needs a byte-fallback model (e.g. ../shared/data's).
"""

import random
import sys

import sentencepiece as spm

from persimmon_tools.tokenizer.write import build_fast_tokenizer

model = sys.argv[1]
sp = spm.SentencePieceProcessor(model_file=model)
fast = build_fast_tokenizer(model)
n = sp.get_piece_size()
byte_ids = [i for i in range(n) if sp.is_byte(i)]
ascii_bytes = [i for i in byte_ids if int(sp.id_to_piece(i)[3:5], 16) < 0x80]
normal = [
    i for i in range(n) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
]
rng = random.Random(0)
texts = ["こんにちは世界", "naïve café", "😀👍🏽", "Привет", "a\nb\tc"]
cases = {"random bytes+pieces": [], "valid text cut mid-char": [], "ascii byte next to a cut char": []}
for _ in range(3000):
    cases["random bytes+pieces"].append(
        [rng.choice(byte_ids if rng.random() < 0.6 else normal) for _ in range(rng.randint(1, 12))]
    )
for t in texts:
    b = t.encode()
    for cut in range(1, len(b)):
        ids = [sp.piece_to_id(f"<0x{x:02X}>") for x in b[:cut]]
        cases["valid text cut mid-char"].append(ids)
        cases["ascii byte next to a cut char"].append([sp.piece_to_id("<0x0A>")] + ids[-2:])
for name, seqs in cases.items():
    bad = [s for s in seqs if sp.decode_ids(s) != fast.decode(s, skip_special_tokens=False)]
    print(f"{name}: {len(bad)} of {len(seqs)} differ", end="")
    if bad:
        s = bad[0]
        print(
            f"; e.g. {[sp.id_to_piece(i) for i in s]}: sp {sp.decode_ids(s)!r} fast {fast.decode(s, skip_special_tokens=False)!r}",
            end="",
        )
    print()
