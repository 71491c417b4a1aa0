"""`--force` (replace an earlier conversion) and `--allow-tokenizer-mismatch` (write a tokenizer that fails
parity) are separate decisions; the second is recorded in conversion.json and on the model card."""

from __future__ import annotations

import json

from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.hub.model_card import build_model_card


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_force_does_not_skip_the_tokenizer_parity_gate(releases, tmp_path, approximate_charsmap):
    out = tmp_path / "out"
    assert cli("convert", releases["tar"], out, "--no-verify").exit_code == 0  # an earlier conversion
    record = json.loads((out / "conversion.json").read_text())
    assert record["tokenizer"]["parity"] == "exact on the built-in sample"
    approximate_charsmap()  # from here on the built tokenizer differs from SentencePiece
    forced = cli("convert", releases["tar"], out, "--force", "--no-verify")
    assert forced.exit_code == 1 and "--allow-tokenizer-mismatch" in forced.stderr, forced.stderr
    assert json.loads((out / "conversion.json").read_text()) == record  # the earlier conversion is untouched
    allowed = cli("convert", releases["tar"], out, "--force", "--allow-tokenizer-mismatch", "--no-verify")
    assert allowed.exit_code == 0, allowed.stderr
    parity = json.loads((out / "conversion.json").read_text())["tokenizer"]["parity"]
    assert parity == "not enforced (--allow-tokenizer-mismatch)"
    card = build_model_card(
        out, "a/b", license="apache-2.0", verified=False, unverified_reason="not verified here"
    )
    assert "not enforced (--allow-tokenizer-mismatch)" in card.text
