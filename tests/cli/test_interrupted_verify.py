"""An interruption says what it left and what to run next, in every command.

Ctrl-C during ``convert``'s automatic verify leaves OUT_DIR complete but unverified: exit 130, a message
that says so, the ``verify`` command as the hint, and ``inspect OUT_DIR`` names the same command. In
process (the verify monkeypatched to raise KeyboardInterrupt) and once with a real SIGINT to a real
``convert`` process, which runs beside the tests (``start_in_background``, see tests/conftest.py's
``background``). The other commands: interrupted mid-work (the progress callback raises), each says
which output is as it was.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.cli.progress import ByteBar

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "tiny_release.tar"
CONVERTED = {
    "config.json",
    "conversion.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def verify_hint(out: Path, source: Path) -> str:
    return f"Hint: persimmon-tools verify {shlex.quote(str(out))} --reference {shlex.quote(str(source))}"


@pytest.fixture
def verify_interrupted(monkeypatch):
    """The automatic verify is interrupted as it starts."""
    import persimmon_tools.verification.verify as verify_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_module, "verify", interrupted)


def test_ctrl_c_during_the_automatic_verify_keeps_out_dir_and_names_verify(
    releases, tmp_path, verify_interrupted
):
    out = tmp_path / "out"
    result = run("convert", releases["tar"], out)
    assert result.exit_code == 130, result.output
    assert (
        f"Error: interrupted during the automatic verify; OUT_DIR {out} is complete but not verified"
        in result.stderr
    )
    assert verify_hint(out, releases["tar"]) in result.stderr.splitlines()
    assert "temporary output was removed" not in result.stderr and "Traceback" not in result.stderr
    assert {p.name for p in out.iterdir()} == CONVERTED  # complete, without verification.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder, no lock

    inspected = run("inspect", out)
    assert inspected.exit_code == 0, inspected.output
    source = json.loads((out / "conversion.json").read_text())["source"]["path"]
    expected = f"verification: not run (persimmon-tools verify {out} --reference {source})"
    assert expected in inspected.stdout.splitlines()
    info = json.loads(run("inspect", out, "--json").stdout)["verification"]
    assert info["state"] == "missing" and info["command"].startswith("persimmon-tools verify ")


def test_the_interrupted_verify_with_json_is_one_error_object(releases, tmp_path, verify_interrupted):
    result = run("convert", releases["tar"], tmp_path / "out", "--json")
    error = json.loads(result.stdout)["error"]
    assert result.exit_code == 130 and error["exit_code"] == 130 and error["type"] == "Interrupted"
    assert error["hint"] == verify_hint(tmp_path / "out", releases["tar"]).removeprefix("Hint: ")


def test_the_library_raises_interrupted_with_the_verify_command(releases, tmp_path, verify_interrupted):
    from persimmon_tools import ConvertOptions
    from persimmon_tools.errors import Interrupted
    from persimmon_tools.workflow import convert

    with pytest.raises(Interrupted, match="complete but not verified") as err:
        convert(releases["tar"], tmp_path / "out", ConvertOptions(iteration=1251))
    assert err.value.exit_code == 130
    assert err.value.hint.endswith("--iteration 1251") and "--reference" in err.value.hint


def _sigint_during_the_verify(background, tmp_path: Path) -> tuple[Path, int, list[str], str]:
    """A ``background`` job: SIGINT to a real ``convert`` in ``tmp_path`` once its log says the automatic
    verify started; (its OUT_DIR, exit code, the stderr lines read before the signal, the rest of stderr)."""
    out = tmp_path / "out"
    seen = []
    with background.spawn(
        # a shell's background jobs inherit SIGINT ignored; Ctrl-C semantics need the default disposition
        background.default_signals(
            [sys.executable, "-m", "persimmon_tools.cli", "convert", str(FIXTURE), str(out)]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=background.environ,
    ) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("verifying "):
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=60)
    return out, proc.returncode, seen, rest


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the real ``convert`` that gets
    the SIGINT runs beside the tests, in a scratch folder of its own."""
    if any(item.originalname == "test_a_real_sigint_during_the_automatic_verify" for item in items):
        background.started[f"{__name__}: real sigint"] = background.submit(
            _sigint_during_the_verify, tmp_path_factory.mktemp("real-sigint")
        )


def test_a_real_sigint_during_the_automatic_verify(background):
    """SIGINT to a real ``convert`` once its log says the automatic verify started."""
    out, returncode, seen, rest = background.result(f"{__name__}: real sigint")
    tmp_path = out.parent
    stderr = "".join(seen) + rest
    assert any(line.startswith("verifying ") for line in seen), stderr
    assert returncode == 130, stderr
    assert (
        f"Error: interrupted during the automatic verify; OUT_DIR {out} is complete but not verified"
        in stderr
    )
    assert verify_hint(out, FIXTURE) in stderr.splitlines() and "Traceback" not in stderr
    assert {p.name for p in out.iterdir()} == CONVERTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- every other command: interrupted mid-work, the message says what is left -------------------------


@pytest.fixture
def interrupted_mid_write(monkeypatch):
    """Ctrl-C at the first bytes written (every byte-counting command reports them to its bar)."""

    def interrupt(self, n_bytes):
        raise KeyboardInterrupt

    monkeypatch.setattr(ByteBar, "__call__", interrupt)


@pytest.mark.parametrize(
    ("command", "label", "work"),
    [
        ("convert", "OUT_DIR", "the conversion"),
        ("export", "OUT", "the export"),
        ("unpack", "DEST", "the extraction"),
        ("make-release", "OUT_TAR", "the release"),
    ],
)
def test_an_interrupted_write_says_the_output_was_not_created(
    releases, converted_tiny, tmp_path, interrupted_mid_write, command, label, work
):
    out = tmp_path / "out"
    args = {
        "convert": ["convert", releases["tar"], out],
        "export": ["export", converted_tiny, out],
        "unpack": ["unpack", releases["tar"], out],
        "make-release": ["make-release", out],
    }[command]
    result = run(*args)
    assert result.exit_code == 130, result.output
    assert f"Error: interrupted before {work} was complete; {label} {out} was not created" in result.stderr
    assert "Hint: run the same command again" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_force_says_the_old_output_is_kept(releases, tmp_path, interrupted_mid_write):
    from persimmon_tools import ConvertOptions
    from persimmon_tools.workflow import convert

    out = tmp_path / "out"
    convert(releases["tar"], out, ConvertOptions(), verify="off")  # the old output (no bar in the library)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run("convert", releases["tar"], out, "--force")
    assert result.exit_code == 130, result.output
    assert (
        f"Error: interrupted before the conversion was complete; OUT_DIR {out} is as it was" in result.stderr
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_interrupted_verify_keeps_the_previous_report(converted_tiny, releases, tmp_path, monkeypatch):
    import shutil

    import persimmon_tools.verification.verify as verify_module

    folder = tmp_path / "hf"
    shutil.copytree(converted_tiny, folder)
    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run("verify", folder, "-r", releases["tar"], "--json-file", tmp_path / "r.json")
    assert result.exit_code == 130, result.output
    report = folder / "verification.json"
    assert (
        f"Error: verify interrupted before it finished; {report} is unchanged (none was written)"
        in result.stderr
    )
    assert f"--json-file {tmp_path / 'r.json'} was not written" in result.stderr
    report.write_text("{}")
    again = run("verify", folder, "-r", releases["tar"])
    assert f"{report} is unchanged (the previous one is kept)" in again.stderr
    assert report.read_text() == "{}"


def test_interrupted_readers_and_tokenizer(releases, tmp_path, monkeypatch):
    import persimmon_tools.conversion.inspect as inspect_module
    import persimmon_tools.tokenizer.check as check_module
    import persimmon_tools.tokenizer.write as write_module
    from persimmon_tools.synth.build import bundled_vocab

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    import persimmon_tools.workflow as workflow

    for module, name in (
        (inspect_module, "inspect_source"),
        (check_module, "check_tokenizer"),
        (workflow, "plan_summary"),
    ):
        monkeypatch.setattr(module, name, interrupt)
    monkeypatch.setattr(write_module, "check_reload", interrupt)  # the files are staged, not yet in place
    sp = tmp_path / "v.model"
    sp.write_bytes(bundled_vocab())
    cases = {
        ("inspect", releases["tar"]): "Error: inspect interrupted; it writes nothing",
        (
            "convert",
            releases["tar"],
            tmp_path / "o",
            "--dry-run",
        ): "Error: convert --dry-run interrupted; it writes",
        ("tokenizer", "--check", sp): "Error: tokenizer --check interrupted; it writes nothing",
        (
            "tokenizer",
            sp,
            tmp_path / "tok",
        ): f"Error: interrupted; no tokenizer file was written to {tmp_path / 'tok'}",
    }
    for args, message in cases.items():
        result = run(*args)
        assert result.exit_code == 130 and message in result.stderr, (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.model"]


def test_an_interrupted_push_passes_its_own_message_through(converted_tiny, monkeypatch):
    import persimmon_tools.hub.push as push_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(push_module, "_push", interrupt)
    result = run("push", converted_tiny, "me/model", "--dry-run")
    assert result.exit_code == 130, result.output
    assert "Error: push interrupted before it finished" in result.stderr
    assert "Hint: re-run the same command to finish it" in result.stderr
