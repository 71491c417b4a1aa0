"""The exact charsmap normalizer, checked against SentencePiece's own normalizer (not only our reference)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import persimmon_tools
from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.charsmap import MAX_EXPLICIT_VALUES, exact_charsmap_steps, spm_normalize
from persimmon_tools.tokenizer.proto import read_proto, read_spm
from persimmon_tools.tokenizer.trie import charsmap_entries, trie_regex

spm = pytest.importorskip("sentencepiece")
normalizers = pytest.importorskip("tokenizers.normalizers")

TINY = Path(persimmon_tools.__file__).parent / "data" / "tiny_vocab.model"  # nmt_nfkc, |ENDOFTEXT| user piece
# Text on which tokenizers' own Precompiled normalizer is wrong: stacked marks out of/in canonical order, a
# half-width voiced kana, CR LF, a full-width letter + mark, conjoining jamo, the Angstrom sign + mark.
HARD = (
    "a\u0323\u0301 a\u0301\u0323 o\u0302\u0323 \uff83\uff9e \r\n \uff21\u0301 \u1100\u1161\u11a8 \u212b\u0301"
)


def _bare(model: Path, tmp_path: Path):
    """SentencePiece with the whitespace options off: ``normalize`` is then the charsmap scan alone."""
    proto = read_proto(model)
    ns = proto.normalizer_spec
    ns.add_dummy_prefix = ns.remove_extra_whitespaces = ns.escape_whitespaces = False
    path = tmp_path / f"bare_{model.name}"
    path.write_bytes(proto.SerializeToString())
    return spm.SentencePieceProcessor(model_file=str(path))


def _texts(alphabet: list[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(count)]


def _users(model: Path) -> tuple[str, ...]:
    info = read_spm(model)
    return tuple(info.pieces[i] for i in info.ids_of(4))


@pytest.fixture(scope="module")
def nfkc():
    info = read_spm(TINY)
    rules = charsmap_entries(info.charsmap)
    steps = normalizers.Sequence(list(exact_charsmap_steps(info.charsmap, _users(TINY))))
    return rules, steps


def test_charsmap_entries_decode_nmt_nfkc(nfkc):
    rules, _ = nfkc
    assert len(rules) > 200_000
    assert (
        rules["\ufb01"] == "fi" and rules["\uff83\uff9e"] == "\u30c7" and rules["a\u0323\u0302"] == "\u1ead"
    )
    assert rules["\x01"] == ""  # nmt_nfkc deletes control characters


def test_reference_scan_is_sentencepiece(nfkc, tmp_path):
    rules, _ = nfkc
    sp = _bare(TINY, tmp_path)
    alphabet = sorted({c for k in list(rules)[::50] for c in k}) + list("ab |ENDOFTEXT|\t\n\r")
    users, longest = _users(TINY), max(map(len, rules))
    for text in [HARD, *_texts(alphabet, 3000)]:
        assert spm_normalize(rules, text, users, longest) == sp.normalize(text), repr(text)


def test_exact_steps_equal_sentencepiece_where_precompiled_does_not(nfkc, tmp_path):
    rules, steps = nfkc
    sp = _bare(TINY, tmp_path)
    alphabet = sorted({c for k in rules if len(k) > 1 for c in k})[::7] + list(
        "aeo \u0301\u0323\r\n\x01|ENDOFTEXT"
    )
    texts = [HARD, *HARD.split(" "), *_texts(alphabet, 5000, seed=1)]
    wrong = [t for t in texts if steps.normalize_str(t) != sp.normalize(t)]
    assert wrong == []
    precompiled = normalizers.Precompiled(read_spm(TINY).charsmap)
    assert [
        t for t in HARD.split(" ") if precompiled.normalize_str(t) != sp.normalize(t)
    ]  # the test can fail


def test_trie_regex_takes_the_longest_word():
    from tokenizers import Regex

    mark = normalizers.Replace(Regex(f"(?:{trie_regex(['ab', 'abc', 'b', 'abcd', 'x.y'])}|[\\s\\S])\\K"), "|")
    assert mark.normalize_str("abcabcdabx.yb") == "abc|abcd|ab|x.y|b|"


def _train_with_rules(tmp_path: Path, rules: str, name: str) -> Path:
    tsv = tmp_path / f"{name}.tsv"
    tsv.write_text(rules, encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc xyz hello world \u03a9\n" * 50 + "".join(map(chr, range(0x21, 0x7F))) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / name),
        vocab_size=200,
        hard_vocab_limit=False,
        normalization_rule_tsv=str(tsv),
        minloglevel=2,
        num_threads=1,
    )
    return tmp_path / f"{name}.model"


def test_custom_rules_are_rewritten_explicitly(tmp_path):
    # "ab"→"X", "a"→"b", "xy"→"z", Ω+acute→"A": not compositions, so NFC cannot produce them.
    model = _train_with_rules(tmp_path, "61 62\t58\n61\t62\n78 79\t7A\n3A9 301\t41\n", "custom")
    sp = _bare(model, tmp_path)
    steps = normalizers.Sequence(list(exact_charsmap_steps(read_spm(model).charsmap)))
    for text in [
        "aab xy abab \u03a9\u0301 \u2126\u0301 \u212b",
        *_texts(list("abxyz \u03a9\u0301\u2126\u212b"), 3000),
    ]:
        assert steps.normalize_str(text) == sp.normalize(text), repr(text)


def test_too_many_custom_values_are_refused(tmp_path):
    lines = "".join(f"61 {0x4E00 + i:X}\t{0x5E00 + i:X}\n" for i in range(MAX_EXPLICIT_VALUES + 10))
    model = _train_with_rules(tmp_path, lines, "many")
    with pytest.raises(TokenizerError) as err:
        exact_charsmap_steps(read_spm(model).charsmap)
    assert (
        "cannot reproduce this model's charsmap" in err.value.message
        and "--allow-tokenizer-mismatch" in err.value.hint
    )


def test_every_key_through_the_whole_pipeline():
    # The build checks most multi-character keys by NFC alone (what the pipeline does with a lone key); here
    # every key of nmt_nfkc goes through the whole pipeline, so that shortcut cannot hide a mistake.
    from persimmon_tools.tokenizer.charsmap import _plan, verify

    info, users = read_spm(TINY), tuple(sorted(set(_users(TINY))))
    plan = _plan(info.charsmap, users)
    steps = list(exact_charsmap_steps(info.charsmap, users))
    assert verify(steps, plan, nfc=True, items=sorted(plan.rules)) == []
