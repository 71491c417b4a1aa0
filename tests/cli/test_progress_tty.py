"""What a user sees in a terminal while a command works (cli/progress.py): a bar with a percentage where the
total is known, binary units (KiB, MiB) as in every message, messages above the bar and never glued onto its
line, the automatic verify's steps as ``verify`` shows them; and nothing of that on a pipe.

One real ``convert`` runs with stderr on a pseudo-terminal, beside the tests (``start_in_background``); the
rest runs in process.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.cli.progress import BarSafeHandler, ByteBar, _BinaryBar

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "fixtures" / "tiny_release.tar"
# tqdm's own decimal units (unit_scale): "843k", "95.3kB/s", "1.13M"
DECIMAL_UNITS = re.compile(r"\d(?:[kMG]B|[kMG](?:/|\b))")
#: The first words of what is not a bar: log messages, the verify steps, the summary.
MESSAGES = (
    "converting ",
    "tokenizer parity",
    "verifying ",
    "  readers",
    "  layer ",
    "verify: ",
    "Converted ",
)


def _run_on_a_terminal(background, args: list[str], cwd: Path) -> tuple[int, str]:
    """A ``background`` job (tests/conftest.py): run ``persimmon_tools.cli`` with stderr on a 100-column
    pseudo-terminal; (exit code, what it drew)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = [background.python(), "-m", "persimmon_tools.cli", *args]  # the terminal passed as a descriptor
    drawn = b""
    try:
        with background.spawn(
            command,
            cwd=cwd,
            env=background.environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=follower,
        ) as proc:
            os.close(follower)
            follower = -1
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
            proc.wait(timeout=120)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return proc.returncode, drawn.decode("utf-8", "replace")


def _make_release_then_export(background, scratch: Path) -> dict[str, tuple[int, str]]:
    """A ``background`` job: ``make-release`` on a terminal, then ``export`` of what it wrote (TP 2 -> 1)."""
    made = _run_on_a_terminal(background, ["make-release", "r.tar", "--tp", "2"], scratch)
    exported = _run_on_a_terminal(background, ["export", "r.tar", "tp1", "--tp", "1"], scratch)
    return {"make-release": made, "export": exported}


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the real commands on a
    terminal run in children beside the tests."""
    names = {item.originalname for item in items}
    if "test_convert_in_a_terminal" in names:
        scratch = tmp_path_factory.mktemp("tty")
        args = ["convert", str(FIXTURE), str(scratch / "out")]
        background.started[__name__] = background.submit(_run_on_a_terminal, args, scratch)
    if "test_every_byte_bar_knows_its_total" in names:
        scratch = tmp_path_factory.mktemp("tty-bars")
        background.started[f"{__name__}: bars"] = background.submit(_make_release_then_export, scratch)


def test_convert_in_a_terminal(background):
    code, drawn = background.result(__name__)
    assert code == 0, drawn
    segments = re.split(r"[\r\n]", drawn)
    bars = [s for s in segments if s.startswith("convert: ")]
    assert any(re.search(r"convert:\s+\d+%\|", s) for s in bars), drawn  # the total is known: a percentage
    assert any("100%|" in s and "842.8 KiB/842.8 KiB" in s for s in bars), drawn
    assert "KiB" in drawn and not DECIMAL_UNITS.search(drawn), drawn
    for segment in segments:  # a bar's line holds the bar alone; a message starts a line of its own
        assert "convert: " not in segment[1:], f"a bar after a message on one line: {segment!r}"
        if segment.startswith("convert: "):
            assert segment.rstrip(" ").endswith("]"), f"a message glued onto the bar: {segment!r}"
        for start in MESSAGES:
            if start.strip() in segment:
                assert segment.startswith(start), f"glued onto another line: {segment!r}"
    lines = [s for s in segments if s]
    for step in (
        "verifying ",
        "  comparing the converter's and verify's own reading",
        "  layer 1/6",
        "  layer 6/6",
        "  head",
        "verify: pass",
    ):
        assert any(line.startswith(step) for line in lines), (step, drawn)  # the automatic verify's steps
    last_bar = max(i for i, s in enumerate(lines) if s.startswith("convert: "))
    first_step = min(i for i, s in enumerate(lines) if s.startswith("  layer "))
    assert last_bar < first_step  # the bar is done before verify starts: no bar below the verify steps


def test_every_byte_bar_knows_its_total(background):
    """make-release and export draw a bar with a percentage that ends at 100 % of the bytes they write."""
    for command, (code, drawn) in background.result(f"{__name__}: bars").items():
        assert code == 0, drawn
        bars = [s for s in re.split(r"[\r\n]", drawn) if s.startswith(f"{command}: ")]
        assert any(re.search(rf"{command}:\s+0%\|", s) for s in bars), drawn  # the total from the start
        done = [s for s in bars if "100%|" in s]
        assert done, drawn
        shown = re.search(r"\| ([\d.]+ [KMG]?i?B)/([\d.]+ [KMG]?i?B) \[", done[-1])
        assert shown and shown.group(1) == shown.group(2), done[-1]
        assert "iB" in shown.group(2) and not DECIMAL_UNITS.search(drawn), drawn


def test_nothing_but_messages_on_a_pipe(releases, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(releases["tar"]), str(tmp_path / "out"), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr and "%|" not in result.stderr and "B/s" not in result.stderr
    assert result.stderr.splitlines()[0].startswith("converting ")


def test_a_bar_counts_in_binary_units():
    out = io.StringIO()
    bar = _BinaryBar(total=3 << 20, desc="convert", file=out, ncols=100, mininterval=0)
    bar.update(3 << 19)
    shown = str(bar)
    assert (
        shown.startswith("convert:  50%|")
        and "1.5 MiB/3.0 MiB [" in shown
        and re.search(r"\d [KMG]iB/s\]", shown)
    )
    assert not DECIMAL_UNITS.search(shown)
    unknown = _BinaryBar(total=None, desc="export", file=out, mininterval=0)
    unknown.update(1536)
    assert str(unknown).startswith("export: 1.5 KiB [") and "%" not in str(unknown)
    bar.close()
    unknown.close()


def test_a_bar_closes_itself_at_its_total():
    out = io.StringIO()
    raw = _BinaryBar(total=None, desc="convert", file=out, ncols=100, mininterval=0)
    bar = ByteBar(raw)
    bar.set_total(2048)
    bar(1024)
    assert not raw.disable
    bar(1024)
    assert raw.disable and out.getvalue().endswith("\n")  # closed: its last line ended
    bar(1024)  # later bytes (none in practice) change nothing
    bar.close()


def test_log_records_go_above_an_active_bar():
    out = io.StringIO()
    bar = _BinaryBar(total=100, desc="convert", file=out, ncols=80, mininterval=0)
    bar.update(10)
    handler = BarSafeHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "tokenizer parity: %d texts", (40,), None)
    handler.emit(record)
    bar.close()
    segments = re.split(r"[\r\n]", out.getvalue())
    assert "tokenizer parity: 40 texts" in segments  # a segment of its own: at column 0, alone on its line
    assert sum(s.startswith("convert: ") and "10%" in s for s in segments) >= 2  # the bar, drawn again below
