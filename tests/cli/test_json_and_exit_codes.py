"""CLI conventions (issue 16, item 4): ``--json`` is a flag of every command with machine output, a failure
with ``--json`` prints one JSON error object on stdout, and one exit code table holds for every command."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.errors import EXIT_CODES

FAST_VERIFY = ("--no-source-hash", "--no-default-prompts", "--ids", "1,2,3")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def json_error(result, exit_code: int) -> dict:
    """The one JSON error object on stdout (json.loads refuses a second document), matching stderr."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert set(error) == {"message", "hint", "exit_code", "type"}
    assert error["exit_code"] == exit_code
    assert f"Error: {error['message']}" in result.stderr  # stderr says the same
    if error["hint"]:
        assert f"Hint: {error['hint']}" in result.stderr
    return error


@pytest.mark.parametrize("command", [None, *sorted(main.commands)])
def test_every_help_ends_with_the_exit_code_table(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0
    table = result.stdout[result.stdout.index("Exit codes:") :]
    for code, name, meaning in EXIT_CODES:
        assert f"  {code:<4} {name}: {meaning}\n" in table, (code, table)  # \b: one line each, not rewrapped


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_a_json_flag(command):
    params = {opt: p for p in main.commands[command].params for opt in p.opts}
    assert "--json" in params and params["--json"].is_flag, command


def test_the_exit_code_table_is_in_the_cli_reference():
    from persimmon_tools.cli.docs import cli_reference_markdown

    doc = cli_reference_markdown()
    for code, name, _ in EXIT_CODES:
        assert f"| {code} | {name} |" in doc


def test_verify_json_prints_the_report_and_json_file_writes_it(converted_tiny, releases, tmp_path):
    report_file = tmp_path / "report.json"
    result = run(
        "verify", converted_tiny, "-r", releases["tar"], *FAST_VERIFY, "--json", "--json-file", report_file
    )
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["verdict"] == "pass" and json.loads(report_file.read_text()) == printed

    report_file.unlink()
    table = run("verify", converted_tiny, "-r", releases["tar"], *FAST_VERIFY, "--json-file", report_file)
    assert table.exit_code == 0, table.stderr
    assert json.loads(report_file.read_text())["verdict"] == "pass"
    with pytest.raises(json.JSONDecodeError):
        json.loads(table.stdout)  # without --json: the table


def test_verify_json_no_longer_takes_a_file(converted_tiny, releases, tmp_path):
    result = run("verify", converted_tiny, "-r", releases["tar"], "--json", tmp_path / "r.json")
    assert json_error(result, 2)["type"] == "UsageError" and not (tmp_path / "r.json").exists()
    dash = run("verify", converted_tiny, "-r", releases["tar"], "--json-file", "-")
    assert dash.exit_code == 2 and "--json prints the report on stdout" in dash.stderr


def test_failed_verification_prints_the_report_only(converted_tiny, releases, tmp_path):
    """Exit 3 with --json: stdout is the report (verdict fail), not a second document with the error."""
    broken = shutil.copytree(converted_tiny, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (broken / "config.json").write_text(json.dumps(config, indent=2))
    result = run("verify", broken, "-r", releases["tar"], *FAST_VERIFY, "--json")
    assert result.exit_code == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail" and "error" not in report
    assert "Error: " in result.stderr and "Hint: " in result.stderr  # after the library's log lines


@pytest.mark.parametrize(
    ("args", "exit_code", "kind", "fragment"),
    [
        (["inspect", "/no/such/path", "--json"], 2, "UsageError", "does not exist"),
        (["convert", "{tar}", "{tmp}/out", "--dtype", "int4", "--json"], 2, "UsageError", "--dtype"),
        (["convert", "{tmp}/corrupt.tar", "{tmp}/out", "--json"], 1, "ReleaseError", "corrupt.tar"),
        (["nosuch", "--json"], 2, "UsageError", "No such command"),
        (["make-release", "{tmp}/r.tar", "--tp", "3", "--json"], 2, "UsageError", "--tp 3"),
    ],
    ids=["inspect-missing", "bad-dtype", "corrupt-tar", "no-such-command", "make-release-tp"],
)
def test_a_failure_with_json_prints_one_error_object(releases, tmp_path, args, exit_code, kind, fragment):
    (tmp_path / "corrupt.tar").write_bytes(b"not a tar archive" * 100)
    result = run(*(a.format(tar=releases["tar"], tmp=tmp_path) for a in args))
    error = json_error(result, exit_code)
    assert error["type"] == kind and fragment in error["message"] and error["hint"], error
    assert not (tmp_path / "out").exists()


def test_without_json_a_failure_prints_nothing_on_stdout(tmp_path):
    (tmp_path / "corrupt.tar").write_bytes(b"not a tar archive" * 100)
    result = run("convert", tmp_path / "corrupt.tar", tmp_path / "out")
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.startswith("Error: ")


def test_json_after_double_dash_is_an_argument_not_the_flag(tmp_path):
    result = run("inspect", "--", "--json")
    assert result.exit_code == 2 and result.stdout == ""


def test_json_is_the_flag_only_where_click_parses_it_as_one(tmp_path):
    """A usage error is decided by click's own parse of the arguments: ``--json`` given as another option's
    value is no flag; an unknown option before it does not hide it."""
    as_value = run("inspect", "--iteration", "--json", tmp_path / "missing")
    assert as_value.exit_code == 2 and as_value.stdout == "" and "--iteration '--json'" in as_value.stderr
    after_unknown = run("inspect", tmp_path / "missing", "--bogus", "--json")
    assert json_error(after_unknown, 2)["type"] == "UsageError"
    group_option = run("--bogus", "inspect", "--json")
    assert "No such option" in json_error(group_option, 2)["message"]


def test_every_command_is_a_persimmon_tools_command():
    """Their failures, while parsing or running, go through the one place that renders errors."""
    from persimmon_tools.cli import Command

    assert all(isinstance(cmd, Command) for cmd in main.commands.values())


@pytest.mark.parametrize(
    ("raised", "exit_code", "kind"),
    [
        (KeyboardInterrupt(), 130, "Interrupted"),
        (PermissionError(13, "Permission denied", "x"), 1, "PermissionError"),
    ],
)
def test_interrupts_and_os_errors_with_json(releases, monkeypatch, raised, exit_code, kind):
    import persimmon_tools.conversion.inspect as inspect_mod

    def boom(*args, **kwargs):
        raise raised

    monkeypatch.setattr(inspect_mod, "inspect_source", boom)
    assert json_error(run("inspect", releases["tar"], "--json"), exit_code)["type"] == kind


def _sp_model(tmp_path):
    from persimmon_tools.synth.build import bundled_vocab

    path = tmp_path / "v.model"
    path.write_bytes(bundled_vocab())
    return path


def _existing_output(command: str, releases, tmp_path) -> list:
    if command == "convert":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("x")
        return ["convert", releases["tar"], tmp_path / "out"]
    if command == "make-release":
        (tmp_path / "out.tar").write_bytes(b"precious")
        return ["make-release", tmp_path / "out.tar"]
    if command == "unpack":
        (tmp_path / "dest" / "tiny_release").mkdir(parents=True)  # an existing DEST is a parent folder:
        (tmp_path / "dest" / "tiny_release" / "x").write_text("x")  # the release's own folder is the output
        return ["unpack", releases["tar"], tmp_path / "dest"]
    (tmp_path / "out").write_text("x")  # tokenizer: OUT_DIR exists and is a file
    return ["tokenizer", _sp_model(tmp_path), tmp_path / "out"]


@pytest.mark.parametrize("command", ["convert", "make-release", "unpack", "tokenizer"])
def test_an_existing_output_is_exit_1_in_every_command(releases, tmp_path, command):
    """The same situation, the same code: an output that exists and is not replaced is a failure (1), with a
    hint naming --force where the command has one that replaces it."""
    error = json_error(run(*_existing_output(command, releases, tmp_path), "--json"), 1)
    assert error["hint"]
    if command in ("convert", "make-release"):
        assert "--force" in error["hint"], error
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "v.model") in (
        ["out"],
        ["out.tar"],
        ["dest"],
    )


def test_make_release_and_unpack_json(tmp_path):
    made = run("make-release", tmp_path / "r.tar", "--json", "-q")
    assert made.exit_code == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["out_tar"] == str(tmp_path / "r.tar") and info["bytes"] == (tmp_path / "r.tar").stat().st_size
    assert (info["preset"], info["tp"], info["pp"], info["dtype"], info["seed"]) == ("tiny", 1, 1, "bf16", 0)

    unpacked = run("unpack", tmp_path / "r.tar", tmp_path / "dest", "--json")
    assert unpacked.exit_code == 0, unpacked.stderr
    info = json.loads(unpacked.stdout)
    assert info["dest"] == str(tmp_path / "dest") and info["files"] > 0 and info["bytes"] > 0
    assert len(info["md5"]) == 32 and info["md5_expected"] is None
