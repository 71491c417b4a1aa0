"""CLI: every option is validated before work starts (exit 2, ``Error:`` naming the flag, ``Hint:``)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.cli.params import SIZE, TOKEN_IDS
from persimmon_tools.errors import UsageError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def usage_failure(result, *fragments: str) -> None:
    assert_clean_failure(result, 2)
    assert "Hint: " in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1048576", 1048576),
        ("200KB", 200_000),
        ("5 gb", 5 * 10**9),
        (".5MiB", 2**19),
    ],
)
def test_sizes_that_are_accepted(text, size):
    assert SIZE.convert(text, None, None) == size


@pytest.mark.parametrize("text", ["abc", "-5", "0", "5G", "1e3", "0.1B", "", "５GB", "9" * 40])
def test_sizes_that_are_refused(text):
    with pytest.raises(UsageError) as err:
        SIZE.convert(text, None, None)
    assert "expected" in err.value.message and "5GB" in err.value.hint


def test_token_ids():
    assert TOKEN_IDS.convert("71013,1, 2", None, None) == (71013, 1, 2)
    assert TOKEN_IDS.convert("1, 306 4658", None, None) == (1, 306, 4658)  # commas, spaces or both
    for bad in ("", "1,x", "-1", "1.5", "٣", str(2**40)):
        with pytest.raises(UsageError):
            TOKEN_IDS.convert(bad, None, None)


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--max-shard-size", "abc", "--max-shard-size 'abc': expected a size"),
        ("--max-shard-size", "0", "between 1 byte"),
        ("--iteration", "-3", "--iteration '-3': expected an iteration number"),
        ("--iteration", "1e3", "--iteration '1e3'"),
        ("--drop-key", "", "--drop-key '': expected non-empty glob pattern"),
        ("--dtype", "int4", "'int4' is not one of"),
    ],
)
def test_convert_options(releases, tmp_path, option, value, fragment):
    """Case option-values (with the other commands' tests below)."""
    usage_failure(run("convert", releases["tar"], tmp_path / "out", "--dry-run", option, value), fragment)
    assert not (tmp_path / "out").exists()


def test_inspect_iteration(releases):
    usage_failure(run("inspect", releases["tar"], "--iteration", "-1"), "--iteration '-1'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tp", "0"], "--tp '0': expected a whole number from 1"),
        (["--tp", "-1"], "--tp '-1'"),
        (["--pp", "0"], "--pp '0'"),
        (["--tp", "3"], "--tp 3 does not divide the tiny preset's 4 heads"),
        (["--pp", "4"], "--pp 4 does not divide the tiny preset's 6 layers"),
        (["--preset", "8b", "--tp", "3"], "the 8b preset's 64 heads"),
        (["--preset", "mid", "--pp", "3"], "the mid preset's 8 layers"),
        (["--seed", "-1"], "--seed '-1': expected a seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--seed", str(2**32)], "expected a seed from 0 to 4294967295"),
        (["--preset", "huge"], "'huge' is not one of"),
    ],
)
def test_make_release_options(tmp_path, args, fragment):
    usage_failure(run("make-release", tmp_path / "r.tar", *args), fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command", [["convert", "{tar}"], ["unpack", "{tar}"], ["make-release"], ["tokenizer", "{vocab}"]]
)
def test_nul_in_an_output_path_is_a_usage_error(releases, tmp_path, command):
    from persimmon_tools.synth.build import bundled_vocab

    (tmp_path / "v.model").write_bytes(bundled_vocab())
    args = [a.format(tar=releases["tar"], vocab=tmp_path / "v.model") for a in command]
    usage_failure(run(*args, f"{tmp_path}/out\x00x"), "expected a path without NUL characters")


def test_make_release_refuses_a_directory_even_with_force(tmp_path):
    result = run("make-release", tmp_path, "--force")  # an existing output: 1, like convert's
    assert_clean_failure(result, 1)
    assert "is a directory" in result.stderr and "Hint: " in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
        (["--ids", "1,x"], "--ids '1,x': expected one or more non-negative integer token ids"),
        (["--ids", "-1"], "--ids '-1'"),
        (["--prompt", ""], "--prompt '': expected non-empty prompt text"),
        (["--prompt", "\udcff"], "valid UTF-8"),
        (["--iteration", "x"], "--iteration 'x'"),
        (["--loader", "torch"], "'torch' is not one of"),
    ],
)
def test_verify_options(converted_tiny, releases, args, fragment):
    usage_failure(run("verify", converted_tiny, "-r", releases["tar"], *args), fragment)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("p.json", b'["a", ', "JSON"),
        ("p.json", b"[" * 100000 + b"]" * 100000, ""),
        ("p.txt", b"\xff\xfe bad", "UTF-8"),
    ],
    ids=["truncated-json", "deep-json", "not-utf8"],
)
def test_verify_prompts_file(converted_tiny, releases, tmp_path, name, data, fragment):
    (tmp_path / name).write_bytes(data)
    result = run("verify", converted_tiny, "-r", releases["tar"], "--prompts-file", tmp_path / name)
    usage_failure(result, str(tmp_path / name), "--prompts-file", fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["convert", "--bogus"], "No such option '--bogus'"),
        (["convert"], "Missing argument 'SOURCE'"),
        (["inspect", "/no/such/path"], "does not exist"),
        (["nosuch"], "No such command 'nosuch'"),
        (["--bogus"], "No such option"),
        (["tokenizer", "x.model", "--allow-ties", "--json", "--chat=1"], "does not take a value"),
    ],
)
def test_click_usage_errors_use_the_error_hint_path(args, fragment):
    result = run(*args)
    usage_failure(result, fragment, "--help`")
    assert result.stderr.startswith("Error: ") and "Usage:" not in result.stderr
    command = args[0] if not args[0].startswith("-") and args[0] != "nosuch" else None
    assert f"run `persimmon-tools{' ' + command if command else ''} --help`" in result.stderr


def test_tokenizer_corpus_directory_and_no_empty_out_dir_left(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "bad.model").write_bytes(b"not a model")
    from persimmon_tools.synth.build import bundled_vocab

    (tmp_path / "v.model").write_bytes(bundled_vocab())
    usage_failure(run("tokenizer", "--check", tmp_path / "v.model", tmp_path / "corpus"), "is a directory")
    result = run("tokenizer", tmp_path / "bad.model", tmp_path / "out")
    assert_clean_failure(result, 1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("spelled", "short"), [("bfloat16", "bf16"), ("float32", "fp32"), ("torch.float16", "fp16")]
)
def test_dtype_accepts_torch_and_transformers_spellings(releases, tmp_path, spelled, short):
    """Issue 16 item 4: `--dtype bfloat16` like transformers' `dtype="bfloat16"`."""
    result = run("convert", releases["tar"], tmp_path / "out", "--dry-run", "--json", "--dtype", spelled)
    assert result.exit_code == 0, result.stderr
    assert (
        json.loads(result.stdout)["dtype"]
        == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[short]
    )
    assert run("convert", releases["tar"], tmp_path / "out", "--dry-run", "--dtype", "int8").exit_code == 2
