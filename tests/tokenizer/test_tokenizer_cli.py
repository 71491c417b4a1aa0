"""``persimmon-tools tokenizer``: write, --check, --json and error paths through the real click group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main

spm = pytest.importorskip("sentencepiece")

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tokenizer_corpus.txt"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("spm_cli")
    out = {}
    no_gt = tmp / "no_gt.txt"  # without '>': "<unk>" is then spelled with a character that has no piece
    no_gt.write_text(CORPUS.read_text(encoding="utf-8").replace(">", ""), encoding="utf-8")
    for name, rule, corpus in (
        ("identity", "identity", CORPUS),
        ("nmt", "nmt_nfkc", CORPUS),
        ("no_gt", "nmt_nfkc", no_gt),
    ):
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(tmp / name),
            vocab_size=700,
            character_coverage=0.98,
            hard_vocab_limit=False,
            normalization_rule_name=rule,
            user_defined_symbols=["|ENDOFTEXT|"],
            byte_fallback=True,
            minloglevel=2,
            num_threads=1,
        )
        out[name] = tmp / f"{name}.model"
    return out


def test_write_and_json(models, tmp_path):
    out = tmp_path / "tok"
    result = CliRunner().invoke(main, ["tokenizer", str(models["identity"]), str(out), "--chat", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["written"]
    assert {Path(p).name for p in written} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",  # --chat: the template also as its own file (issue 23, part F)
    }
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == "|ENDOFTEXT|"
    assert config["add_bos_token"] is True and "chat_template" in config


def test_no_add_bos_flag(models, tmp_path):
    result = CliRunner().invoke(
        main, ["tokenizer", str(models["identity"]), str(tmp_path), "--no-add-bos", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is False


def test_model_max_length_option(models, tmp_path):
    from persimmon_tools.tokenizer.write import MODEL_MAX_LENGTH

    runner = CliRunner()
    default, given = tmp_path / "default", tmp_path / "given"
    assert runner.invoke(main, ["tokenizer", str(models["identity"]), str(default), "-q"]).exit_code == 0
    result = runner.invoke(
        main, ["tokenizer", str(models["identity"]), str(given), "--model-max-length", "2048", "-q"]
    )
    assert result.exit_code == 0, result.output
    configs = [json.loads((f / "tokenizer_config.json").read_text()) for f in (default, given)]
    assert [c["model_max_length"] for c in configs] == [MODEL_MAX_LENGTH, 2048]
    help_text = " ".join(runner.invoke(main, ["tokenizer", "--help"]).output.split())
    assert f"default: {MODEL_MAX_LENGTH}" in help_text  # the help states the write module's value
    for bad in ("0", "-1", "x"):
        result = runner.invoke(
            main, ["tokenizer", str(models["identity"]), str(tmp_path / bad), "--model-max-length", bad]
        )
        assert result.exit_code == 2 and not (tmp_path / bad).exists(), result.output
    result = runner.invoke(main, ["tokenizer", "--check", str(models["identity"]), "--model-max-length", "8"])
    assert result.exit_code != 0 and "only apply when writing" in result.output


def test_check_builtin_sample_passes(models):
    result = CliRunner().invoke(main, ["tokenizer", "--check", str(models["identity"])])
    assert result.exit_code == 0, result.output
    assert "0 encode, 0 decode mismatches" in result.output and "built-in sample" in result.output


def test_check_corpus_json(models, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n東京\n\n", encoding="utf-8")
    result = CliRunner().invoke(
        main, ["tokenizer", "--check", str(models["identity"]), str(corpus), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["items"] == 3 and report["ok"] is True


def test_stacked_marks_and_crlf_are_exact(models, tmp_path):
    corpus = tmp_path / "marks.txt"
    corpus.write_text("windows\r\nline end\nstacked a\u0323\u0301 \uff83\uff9e\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tokenizer", "--check", str(models["nmt"]), str(corpus)])
    assert result.exit_code == 0, result.output


def test_check_mismatch_exits_1_and_shows_pieces(models, tmp_path, approximate_charsmap):
    approximate_charsmap()
    corpus = tmp_path / "residual.txt"
    corpus.write_text("windows\r\nline end\nstacked a\u0323\u0301\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tokenizer", "--check", str(models["nmt"]), str(corpus)])
    assert result.exit_code == 1
    assert "first difference at piece" in result.output
    assert "Error:" in result.output and "Hint:" in result.output


def test_write_refuses_failing_model_without_force(models, tmp_path, approximate_charsmap):
    approximate_charsmap()
    out = tmp_path / "tok"
    result = CliRunner().invoke(main, ["tokenizer", str(models["nmt"]), str(out)])
    assert result.exit_code == 1
    assert "--allow-tokenizer-mismatch" in result.output
    assert not (out / "tokenizer.json").exists()
    forced = CliRunner().invoke(main, ["tokenizer", str(models["nmt"]), str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "tokenizer.json").is_file()


def test_inexpressible_model_is_refused_and_force_checks_the_approximation(models, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("plain words\nliteral <unk> and </s>\n", encoding="utf-8")
    runner = CliRunner()
    refused = runner.invoke(main, ["tokenizer", "--check", str(models["no_gt"]), str(corpus)])
    assert refused.exit_code == 1
    assert "cannot be converted exactly" in refused.output and "reserved pieces" in refused.output
    assert "Hint:" in refused.output and "--allow-tokenizer-mismatch" in refused.output
    forced = runner.invoke(
        main, ["tokenizer", "--check", "--force", str(models["no_gt"]), str(corpus), "--json"]
    )
    assert forced.exit_code == 1  # the approximation really differs on the literal reserved names
    report = json.loads(forced.stdout)
    assert report["items"] == 2 and report["encode_mismatches"] == 1
    written = runner.invoke(main, ["tokenizer", str(models["no_gt"]), str(tmp_path / "out")])
    assert written.exit_code == 1 and not (tmp_path / "out" / "tokenizer.json").exists()


def test_usage_errors(models, tmp_path):
    runner = CliRunner()
    no_out = runner.invoke(main, ["tokenizer", str(models["identity"])])
    assert no_out.exit_code == 2 and "OUT_DIR" in no_out.output
    bad_combo = runner.invoke(main, ["tokenizer", "--check", str(models["identity"]), "--chat"])
    assert bad_combo.exit_code == 2
    missing = runner.invoke(
        main, ["tokenizer", "--check", str(models["identity"]), str(tmp_path / "nope.txt")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
    not_a_model = runner.invoke(main, ["tokenizer", str(CORPUS), str(tmp_path / "x")])
    assert not_a_model.exit_code == 1 and "SentencePiece" in not_a_model.output


def test_help_has_examples():
    result = CliRunner().invoke(main, ["tokenizer", "--help"])
    assert result.exit_code == 0
    assert "persimmon-tools tokenizer --check adept_vocab.model corpus.txt" in result.output


SP_TEST_MODEL = Path(__file__).resolve().parents[1] / "data" / "sentencepiece_test_model.model"


def test_float32_ties_fail_the_check_unless_allowed(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat ---\nplain words\n", encoding="utf-8")  # the first line is a float32 tie
    runner = CliRunner()
    strict = runner.invoke(main, ["tokenizer", "--check", str(SP_TEST_MODEL), str(corpus)])
    assert strict.exit_code == 1
    assert "1 encode mismatch is a float32 tie" in strict.output and "float32 rounding" in strict.output
    allowed = runner.invoke(main, ["tokenizer", "--check", "--allow-ties", str(SP_TEST_MODEL), str(corpus)])
    assert allowed.exit_code == 0, allowed.output
    assert "1 encode, 0 decode mismatches" in allowed.output


def test_write_gate_accepts_ties_only_with_allow_ties(tmp_path, monkeypatch):
    import persimmon_tools.tokenizer.write as tokenizer_module
    from persimmon_tools.tokenizer.check import ParityReport

    def fake_report(encode: int, ties: int):
        return lambda sp, info, fast, texts=None: ParityReport(
            str(info.path), 40, encode, 0, ["example"], ties
        )

    monkeypatch.setattr(tokenizer_module, "parity_report", fake_report(1, 1))
    refused = CliRunner().invoke(main, ["tokenizer", str(SP_TEST_MODEL), str(tmp_path / "a")])
    assert refused.exit_code == 1 and "--allow-ties" in refused.output
    assert not (tmp_path / "a" / "tokenizer.json").exists()
    written = CliRunner().invoke(main, ["tokenizer", str(SP_TEST_MODEL), str(tmp_path / "b"), "--allow-ties"])
    assert written.exit_code == 0, written.output
    assert (tmp_path / "b" / "tokenizer.json").is_file()
    monkeypatch.setattr(tokenizer_module, "parity_report", fake_report(2, 1))  # one real difference
    mixed = CliRunner().invoke(main, ["tokenizer", str(SP_TEST_MODEL), str(tmp_path / "c"), "--allow-ties"])
    assert mixed.exit_code == 1 and "--allow-tokenizer-mismatch writes it anyway" in mixed.output
