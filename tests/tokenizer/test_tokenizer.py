"""Parity of the fast tokenizer with SentencePiece on models trained here and on a real model."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from persimmon_tools.errors import TokenizerError
from persimmon_tools.tokenizer.build import build_normalizer
from persimmon_tools.tokenizer.proto import read_spm
from persimmon_tools.tokenizer.unigram import reserved_plan
from persimmon_tools.tokenizer.write import (
    CHAT_TEMPLATE,
    TokenizerOptions,
    build_fast_tokenizer,
    builtin_sample,
    chat_template,
    check_parity,
    write_tokenizer,
)

spm = pytest.importorskip("sentencepiece")

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "tokenizer_corpus.txt"
SP_TEST_MODEL = REPO / "tests" / "data" / "sentencepiece_test_model.model"  # see tests/data/README.md
REAL_MODEL = REPO.parent / "shared" / "data" / "cc100_ja40K_en10K.symbolRemoved.vocab.reestimated.model"

# Graphemes on which tokenizers' own Precompiled normalizer differs from SentencePiece's longest-match
# charsmap (it replaces a short grapheme by the value of its *shortest* key prefix and never applies
# multi-character rules inside graphemes of 6+ bytes); the exact pipeline must get them right.
CHARSMAP_GRAPHEMES = (
    "a\u0323\u0301",
    "a\u0301\u0323",
    "o\u0302\u0323",
    "\uff83\uff9e",
    "\r\n",
    "\uff21\u0301",
)

MODELS = {
    # name: trainer options (all on tests/data/tokenizer_corpus.txt)
    "unigram_nmt_bytefallback": dict(model_type="unigram", byte_fallback=True),
    "unigram_nmt_unk": dict(model_type="unigram", byte_fallback=False),
    # Like T5's spiece.model: no byte fallback, and no piece contains '<', '>' or '/' (so the reserved names
    # are spelled with characters SentencePiece treats as unknown; tokenizer_unigram blocks them).
    "unigram_nmt_unk_no_brackets": dict(model_type="unigram", byte_fallback=False, drop_chars="<>/"),
    # Case folding: 'A'..'F' never reach the model, so byte pieces such as <0x41> can never match.
    "unigram_nmt_cf_bytefallback": dict(
        model_type="unigram", normalization_rule_name="nmt_nfkc_cf", byte_fallback=True
    ),
    "unigram_identity_bytefallback": dict(
        model_type="unigram", normalization_rule_name="identity", byte_fallback=True
    ),
    "unigram_nfkc_no_dummy": dict(
        model_type="unigram", normalization_rule_name="nfkc", add_dummy_prefix=False
    ),
    "unigram_identity_keep_spaces": dict(
        model_type="unigram",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
    ),
    "unigram_digits_no_ws_split": dict(
        model_type="unigram",
        split_digits=True,
        split_by_whitespace=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
    ),
    "unigram_user_control": dict(
        model_type="unigram",
        normalization_rule_name="identity",
        user_defined_symbols=["<br>", "|ENDOFTEXT|", "def"],
        control_symbols=["<ctl>", "[SEP]"],
        byte_fallback=True,
    ),
    "unigram_nmt_user_control": dict(
        model_type="unigram",
        user_defined_symbols=["<br>", "|ENDOFTEXT|"],
        control_symbols=["<ctl>"],
        byte_fallback=True,
    ),
    "unigram_identity_no_dummy_keep_spaces": dict(
        model_type="unigram",
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
    ),
    "unigram_nmt_suffix": dict(model_type="unigram", treat_whitespace_as_suffix=True, byte_fallback=True),
    "unigram_nmt_suffix_keep_spaces": dict(
        model_type="unigram",
        treat_whitespace_as_suffix=True,
        remove_extra_whitespaces=False,
        byte_fallback=True,
    ),
    "bpe_nmt_bytefallback": dict(model_type="bpe", byte_fallback=True),
    "bpe_identity_unk": dict(model_type="bpe", normalization_rule_name="identity", byte_fallback=False),
    "bpe_identity_keep_spaces_digits": dict(
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=True,
    ),
    "bpe_user_defined": dict(
        model_type="bpe",
        normalization_rule_name="identity",
        user_defined_symbols=["<br>", "def"],
        byte_fallback=True,
    ),
}


def corpus() -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    extra = [
        "",
        " ",
        "  \t \n ",
        "trailing space ",
        " leading space",
        "a  b   c    d",
        "\u2581literal\u2581lower\u2581blocks\u2581",
        "x <unk> y </s> <s> <0x41>",  # literal text equal to reserved piece names
        "<br><br>def|ENDOFTEXT|<ctl>",
        "<br></s><br>def<unk>def<br><0x41>",  # reserved names as whole chunks between user-defined symbols
        "1234567890" * 5,
        "=" * 40,
        "\x00\x01\x02\x1f\x7f",
        "\x01",  # normalizes to nothing under nmt_nfkc, but SentencePiece still adds its dummy ▁ / suffix ▁
        " \x01 ",
        "\ufeff\u200b\u200d\u2028\u2029",
        "\U0001f600" * 3 + "\U0001faf6\U0001f3fd",
        *CHARSMAP_GRAPHEMES,
    ]
    joined = ["\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    return lines + extra + joined + builtin_sample()


def _train(tmp: Path, name: str, options: dict, corpus_file: Path = CORPUS) -> Path:
    opts = dict(options)
    drop = opts.pop("drop_chars", "")
    if drop:  # train on the corpus without these characters
        text = corpus_file.read_text(encoding="utf-8")
        corpus_file = tmp / f"{name}.txt"
        corpus_file.write_text(text.translate({ord(c): None for c in drop}), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(tmp / name),
        vocab_size=opts.pop("vocab_size", 700),
        hard_vocab_limit=False,
        character_coverage=opts.pop("character_coverage", 0.98),
        minloglevel=2,
        num_threads=1,
        **opts,
    )
    return tmp / f"{name}.model"


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("spm")
    return {name: _train(tmp, name, opts) for name, opts in MODELS.items()}


def _texts_for(model: Path) -> list[str]:
    """The whole corpus: every model trained here converts exactly (ties aside, see the assertion below)."""
    assert read_spm(model).pieces
    return corpus()


def parity_reports(tmp: Path) -> dict[str, dict]:
    """Every model of ``MODELS`` trained into ``tmp`` (as the ``trained`` fixture does) and its parity on the
    whole corpus: what ``test_parity_on_trained_models`` checks. Runs in a child beside the tests."""
    reports = {}
    for name, options in MODELS.items():
        model = _train(tmp, name, options)
        texts = _texts_for(model)
        report = check_parity(model, texts)
        reports[name] = {
            "texts": len(texts),
            "items": report.items,
            "encode_mismatches": report.encode_mismatches,
            "decode_mismatches": report.decode_mismatches,
            "tie_mismatches": report.tie_mismatches,
            "examples": report.examples,
        }
    return reports


_PARITY_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("tokenizer_parity_cases", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(module.parity_reports(Path(sys.argv[2]))))
    """
)


def _parity_in_a_child(background, tmp: Path) -> dict[str, dict]:
    """A ``background`` job (tests/conftest.py): :func:`parity_reports` in a child process."""
    done = background.run(
        [background.python(), "-c", _PARITY_CHILD, __file__, str(tmp)],
        cwd=REPO,
        env={**background.environ, "PYTHONPATH": str(REPO / "tests")},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the parity of every trained model
    on the corpus is computed in a child beside the tests (it is most of this module's CPU)."""
    if any(item.originalname == "test_parity_on_trained_models" for item in items):
        background.started[f"{__name__}: parity"] = background.submit(
            _parity_in_a_child, tmp_path_factory.mktemp("spm-parity")
        )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parity_on_trained_models(background, name):
    """Each model trained and checked on the whole corpus in a child beside the tests (``start_in_background``)."""
    report = background.result(f"{__name__}: parity")[name]
    examples = "\n".join(report["examples"])
    assert report["items"] == report["texts"] > 60
    assert report["decode_mismatches"] == 0, examples
    # Any encode difference must be an exact tie between two optimal segmentations (Unigram only).
    assert report["encode_mismatches"] == report["tie_mismatches"], examples


@pytest.mark.parametrize(
    "name", ["unigram_nmt_bytefallback", "bpe_nmt_bytefallback", "unigram_nfkc_no_dummy"]
)
def test_charsmap_graphemes_are_exact(trained, name, approximate_charsmap):
    # These texts really differ with tokenizers' own Precompiled normalizer (so the test can fail), and the
    # exact pipeline gets every one right.
    texts = [f"x {g} y" for g in CHARSMAP_GRAPHEMES] + [" ".join(CHARSMAP_GRAPHEMES)]
    assert check_parity(trained[name], texts).ok
    approximate_charsmap()
    report = check_parity(trained[name], texts)
    assert report.encode_mismatches > 0
    assert "first difference at piece" in report.examples[0]


def test_decode_parity_on_every_piece(trained):
    for name in ("unigram_user_control", "unigram_nmt_bytefallback", "bpe_user_defined"):
        sp = spm.SentencePieceProcessor(model_file=str(trained[name]))
        fast = build_fast_tokenizer(trained[name])
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                continue
            for ids in ([i], [i, i], [sp.piece_to_id("\u2581a") if sp.piece_to_id("\u2581a") else 3, i]):
                assert fast.decode(ids, skip_special_tokens=False) == sp.decode_ids(ids), (name, ids)


@pytest.mark.skipif(not REAL_MODEL.is_file(), reason=f"real SentencePiece model not found at {REAL_MODEL}")
def test_real_unigram_byte_fallback_model():
    info = read_spm(REAL_MODEL)
    assert info.byte_fallback and info.model_type == 1 and len(info.pieces) > 40000
    report = check_parity(REAL_MODEL, corpus())
    assert report.items > 100
    assert report.ok, "\n".join(report.examples)


@pytest.mark.parametrize("name", ["unigram_user_control", "unigram_nmt_user_control"])
def test_autotokenizer_loads_and_matches(trained, tmp_path, name):
    # identity and nmt_nfkc (the exact charsmap pipeline, as transformers loads it from tokenizer.json)
    transformers = pytest.importorskip("transformers")
    model = trained[name]
    written = write_tokenizer(model, tmp_path, TokenizerOptions(chat=True))
    assert {p.name for p in written} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",  # a chat conversion: the template in both places (docs/tokenizer.md)
    }
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    eot = sp.piece_to_id("|ENDOFTEXT|")
    assert tok.bos_token_id == tok.eos_token_id == eot
    assert tok.unk_token_id == sp.unk_id()
    specials = ("|ENDOFTEXT|", "<unk>")
    for text in _texts_for(model):
        ids = sp.encode(text)
        # split_special_tokens=True: literal special-token text encodes as SentencePiece encodes it
        assert tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids, text
        assert tok(text, split_special_tokens=True)["input_ids"] == [eot, *ids], text
        if not any(
            s in text for s in specials
        ):  # the default call agrees wherever no special token is spelled
            assert tok(text)["input_ids"] == [eot, *ids], text
        assert tok.decode(ids) == sp.decode_ids(ids), text
    # The default (transformers' split_special_tokens=False): literal special-token text is that token.
    assert tok("x <unk> y|ENDOFTEXT|")["input_ids"].count(eot) == 2
    assert sp.unk_id() in tok("x <unk> y")["input_ids"]


def test_no_add_bos(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = trained["unigram_user_control"]
    write_tokenizer(model, tmp_path, TokenizerOptions(add_bos_token=False))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert tok("hello world")["input_ids"] == sp.encode("hello world")


def test_reload_check_encodes_literal_special_tokens_like_sentencepiece(trained, tmp_path):
    """check_reload compares with split_special_tokens=True, the call that equals SentencePiece on any text."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from persimmon_tools.tokenizer.reload import check_reload

    write_tokenizer(trained["unigram_user_control"], tmp_path)
    written = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    check_reload(tmp_path, written, ["a |ENDOFTEXT| b", "x <unk> y", "plain"], origin="test")


def test_no_add_bos_chat_template_renders_no_bos(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(
        trained["unigram_user_control"], tmp_path, TokenizerOptions(add_bos_token=False, chat=True)
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE == chat_template(False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "human: hi\n\nadept:"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == tok(text)["input_ids"]
    assert tok.bos_token_id not in ids["input_ids"]


def test_chat_template_reproduces_adept_prompt(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(trained["unigram_user_control"], tmp_path, TokenizerOptions(chat=True))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    one = [{"role": "user", "content": "What is a persimmon?"}]
    bos = "|ENDOFTEXT|"  # add_bos_token is on: the template renders bos_token first
    assert (
        tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True)
        == bos + "human: What is a persimmon?\n\nadept:"
    )
    multi = [*one, {"role": "assistant", "content": "A fruit."}, {"role": "user", "content": "Which colour?"}]
    prompt = "human: What is a persimmon?\n\nadept: A fruit.\n\nhuman: Which colour?\n\nadept:"
    assert tok.apply_chat_template(multi, tokenize=False, add_generation_prompt=True) == bos + prompt
    ids = tok.apply_chat_template(multi, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == tok(prompt)["input_ids"]
    assert ids["input_ids"].count(tok.bos_token_id) == 1
    with pytest.raises(Exception, match="only user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    assert "chat_template" not in json.loads(
        (_plain(trained, tmp_path) / "tokenizer_config.json").read_text()
    )
    assert "human: " in CHAT_TEMPLATE


def _plain(trained, tmp_path: Path) -> Path:
    out = tmp_path / "plain"
    out.mkdir()
    write_tokenizer(trained["unigram_user_control"], out)
    return out


def test_check_failure_writes_nothing(trained, tmp_path, approximate_charsmap):
    # A tokenizer that disagrees with SentencePiece on the built-in sample: the gate must refuse it.
    approximate_charsmap()
    with pytest.raises(TokenizerError) as err:
        write_tokenizer(trained["unigram_nmt_bytefallback"], tmp_path)
    assert "encode" in err.value.message and "first difference" in err.value.message
    assert "--allow-tokenizer-mismatch" in err.value.hint
    assert list(tmp_path.iterdir()) == []
    written = write_tokenizer(trained["unigram_nmt_bytefallback"], tmp_path, TokenizerOptions(check=False))
    assert all(p.is_file() for p in written)


def test_special_tokens_fall_back_to_the_eos_piece_like_adept(trained, tmp_path):
    """Without |ENDOFTEXT|, ADEPT's code uses eos_id() as end-of-document, which it also prepends as BOS."""
    write_tokenizer(trained["unigram_identity_bytefallback"], tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("</s>", "</s>", "<unk>")


def test_inexpressible_options_raise(trained, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(trained["unigram_identity_bytefallback"].read_bytes())
    proto.denormalizer_spec.precompiled_charsmap = (
        proto.denormalizer_spec.precompiled_charsmap or b"\x04\x00\x00\x00xxxx"
    )
    bad = tmp_path / "denorm.model"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match="denormalizer"):
        build_fast_tokenizer(bad)
    with pytest.raises(TokenizerError, match="not a SentencePiece model|no pieces"):
        build_fast_tokenizer(CORPUS)


def test_reserved_pieces_spelled_with_unknown_characters_are_refused(tmp_path):
    # Trained on text without '>' (so "<unk>", "</s>" and "<0x41>" contain a character with no piece of its
    # own): tokenizers' Unigram would match literal "<unk>" as the reserved piece, SentencePiece never does.
    corpus_file = tmp_path / "no_gt.txt"
    corpus_file.write_text(CORPUS.read_text(encoding="utf-8").replace(">", ""), encoding="utf-8")
    model = _train(tmp_path, "m", dict(model_type="unigram", byte_fallback=True), corpus_file)
    with pytest.raises(TokenizerError) as err:
        build_fast_tokenizer(model)
    assert "reserved pieces" in err.value.message and "'>'" in err.value.message
    assert "--allow-tokenizer-mismatch" in err.value.hint
    # The refusal is not hypothetical: the approximation (what --force writes) really differs there.
    report = check_parity(model, ["x <unk> y </s> <0x41>"], strict=False)
    assert report.encode_mismatches == 1
    assert check_parity(model, ["plain text, no reserved names"], strict=False).ok


def test_reserved_names_spelled_with_unknown_characters_are_blocked_without_byte_fallback(trained):
    # No piece contains '<', '>' or '/': SentencePiece encodes them as <unk>, so the fast tokenizer may map
    # them to a stand-in, and then literal "<unk>" can no longer match the reserved piece.
    model = trained["unigram_nmt_unk_no_brackets"]
    info = read_spm(model)
    plan = reserved_plan(info)
    assert set(plan.remapped) == {"<", ">", "/"} and not plan.hide and not plan.problem
    texts = ["x <unk> y </s> <s>", "<unk>", "a/b <i> c", "<<unk>>"]
    assert check_parity(model, texts).ok
    sp = spm.SentencePieceProcessor(model_file=str(model))
    fast = build_fast_tokenizer(model)
    enc = fast.encode("x <unk> y")
    assert enc.ids == sp.encode("x <unk> y") and info.unk_id in enc.ids
    # Offsets still point at the original characters behind each <unk>.
    assert all(
        set("x <unk> y"[a:b]) <= set("<>")
        for t, (a, b) in zip(enc.ids, enc.offsets, strict=True)
        if t == info.unk_id
    )
    # Without the last step (the stand-in), tokenizers matches the reserved piece: the step is load-bearing.
    fast.normalizer = build_normalizer(info)
    assert fast.encode("x <unk> y").ids != sp.encode("x <unk> y")


def test_reserved_names_the_normalizer_never_produces_need_nothing(trained):
    # Under case folding 'A'..'F' are always rewritten, so "<0x41>" never occurs in normalized text: exact
    # even with byte fallback, where characters cannot be mapped to a stand-in.
    info = read_spm(trained["unigram_nmt_cf_bytefallback"])
    plan = reserved_plan(info)
    assert {"A", "B", "F", "Z"} <= plan.unproduced and "a" not in plan.unproduced
    assert not plan.problem and not plan.remapped
    texts = ["x <0x41> <0x0A> <unk> </s> y", "ABC <0xFF>", "<0x61>"]
    assert check_parity(trained["unigram_nmt_cf_bytefallback"], texts).ok


def test_one_character_control_piece_in_a_unigram_model(trained, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    for name, exact in (("unigram_nmt_unk", True), ("unigram_nmt_bytefallback", False)):
        proto = pb.ModelProto()
        proto.ParseFromString(trained[name].read_bytes())
        piece = proto.pieces.add()
        piece.piece, piece.type, piece.score = "\u00a7", pb.ModelProto.SentencePiece.CONTROL, 0.0
        model = tmp_path / f"{name}_section.model"
        model.write_bytes(proto.SerializeToString())
        if exact:  # '§' is unknown to SentencePiece; without byte fallback it is blocked like '<' above
            assert check_parity(model, ["a \u00a7 b", "\u00a7\u00a7", "\u00a7"]).ok
        else:  # with byte fallback its bytes are the ids, so it cannot be mapped away
            with pytest.raises(TokenizerError, match="byte fallback needs"):
                build_fast_tokenizer(model)


def test_sentencepiece_own_test_model():
    # A real Unigram model (sentencepiece's own test model): no byte fallback and no piece contains '<', '>'
    # or '/', so its reserved names are blocked rather than refused.
    info = read_spm(SP_TEST_MODEL)
    plan = reserved_plan(info)
    assert {"<", ">", "/"} <= set(plan.remapped) and not plan.problem and not info.byte_fallback
    report = check_parity(SP_TEST_MODEL, corpus())
    assert report.items > 100 and report.ok, "\n".join(report.examples)
    # Runs of repeated pieces are where float32 ties show up (docs/tokenizer.md): every difference there must
    # be such a tie, never anything else.
    runs = [c * n for c in ".!-=0ab…" for n in range(2, 30)]
    ties = check_parity(SP_TEST_MODEL, runs)
    assert ties.decode_mismatches == 0 and ties.encode_mismatches == ties.tie_mismatches > 0


def test_float32_ties_depend_on_the_text_before_them():
    # Why no tokenizer.json reproduces float32 ties: SentencePiece adds path scores in float32, so how it splits
    # the same run ("---" after a forced boundary at "▁") depends on the rounding of the score of the text
    # before it. tokenizers' Viterbi adds the same float32 scores exactly (float64), so after a forced
    # boundary its choice cannot depend on what came before, whatever scores tokenizer.json holds.
    sp = spm.SentencePieceProcessor(model_file=str(SP_TEST_MODEL))
    fast = build_fast_tokenizer(SP_TEST_MODEL)
    after_3_words = sp.encode("the cat sat ---", out_type=str)
    after_4_words = sp.encode("the cat sat on ---", out_type=str)
    assert after_3_words[-3:] == ["▁", "--", "-"] and after_4_words[-3:] == ["▁", "-", "--"]
    assert fast.encode("the cat sat ---").tokens[-3:] == fast.encode("the cat sat on ---").tokens[-3:]


MIXED = [
    *"aeiou xyz0123.,!<>|\t\n\r",
    *"éñüßøÅΩ東京한ก",
    *"\u0301\u0323\u0302\u0308\uff83\uff9e\uff21\u1100\u1161\u11a8\u3131\u314f\ufb01\u2460\u00bd\u3000\u00a0",
    *"\x01\u200d\U0001f44d\U0001f3fd\u0e33\u0915\u093c\u0958\u212b\u2126",
]


@pytest.mark.parametrize(
    "name", ["unigram_nmt_bytefallback", "bpe_nmt_bytefallback", "unigram_nfkc_no_dummy"]
)
def test_random_mixed_text_parity_and_offsets(trained, name):
    import random

    rng = random.Random(0)
    texts = ["".join(rng.choice(MIXED) for _ in range(rng.randint(0, 16))) for _ in range(1500)]
    report = check_parity(trained[name], texts)
    assert report.decode_mismatches == 0, "\n".join(report.examples)
    assert report.encode_mismatches == report.tie_mismatches, "\n".join(report.examples)
    fast = build_fast_tokenizer(trained[name])
    for text in texts[:400]:  # the inserted markers leave sane offsets into the original text
        offsets = fast.encode(text).offsets
        assert all(0 <= a <= b <= len(text) for a, b in offsets), (text, offsets)
