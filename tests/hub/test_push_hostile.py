"""Hostile Hubs and folders for ``push`` (issue 22, part D).

* A Hub that trickles its answer (a byte every 0.2 s, so no idle timeout ever fires) or never answers is
  cut at ``--deadline``: push fails (dry run: shows the local plan) naming the endpoint, within seconds
  here (``--timeout 1 --deadline 0.6``); every request's answer has that deadline, inside a step or not.
* conversion.json / verification.json holding a value of the wrong type is a HubError naming the file and
  the key, before anything is sent.
* An exported (Megatron-layout) folder is "not a converted Hugging Face folder", not "not verified".
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_server import HubServer

from persimmon_tools.hub.network import Timeouts, hub_timeouts
from persimmon_tools.synth.build import ReleaseOptions, make_release

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "alice/persimmon-8b-chat"
FAST_LIMITS = ("--timeout", "1", "--deadline", "0.6")
TRICKLE_FOR = 30.0  # seconds a trickling answer lasts at most (a broken deadline fails, never hangs)


def run_cli(*args: object):
    from persimmon_tools.cli import main

    return CliRunner().invoke(main, ["push", *(str(a) for a in args)])


@contextlib.contextmanager
def trickling_server(where: str) -> Iterator[str]:
    """A server on 127.0.0.1 that reads each request, then sends its answer one piece every 0.2 s: the
    status line and then header lines forever (``where="headers"``), or complete headers and then a body
    of 100,000 bytes one byte at a time (``"body"``). It stops after :data:`TRICKLE_FOR` seconds."""
    stop = threading.Event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)

    def answer(conn: socket.socket) -> None:
        end = time.monotonic() + TRICKLE_FOR
        with contextlib.suppress(OSError), conn:
            conn.settimeout(5)
            conn.recv(65536)
            if where == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                piece = b"X-Slow: a\r\n"
            else:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
                piece = b" "
            while not stop.is_set() and time.monotonic() < end:
                conn.sendall(piece)
                time.sleep(0.2)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


# ---- a Hub that trickles or never answers ------------------------------------------------------------


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_hub_fails_push_at_the_deadline(hub: HubServer, converted, where: str) -> None:
    folder = converted()
    with trickling_server(where) as url:
        start = time.monotonic()
        result = run_cli(folder, REPO, "--endpoint", url, *FAST_LIMITS)
        elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    assert elapsed < 6, elapsed  # without the deadline: as long as the server trickles (30 s here)
    assert f"Error: could not create the repository: no usable answer from {url}" in result.stderr
    assert "the 0.6 s deadline ran out" in result.stderr and "Hint:" in result.stderr
    assert "--deadline" in result.stderr and "Traceback" not in result.output
    assert hub.repos == {}  # nothing reached the real (local) Hub


def test_a_trickling_hub_dry_run_shows_the_local_plan(hub: HubServer, converted) -> None:
    with trickling_server("headers") as url:
        start = time.monotonic()
        result = run_cli(converted(), REPO, "--endpoint", url, "--dry-run", "--json", *FAST_LIMITS)
        elapsed = time.monotonic() - start
    assert result.exit_code == 0 and elapsed < 6, (elapsed, result.output)
    plan = json.loads(result.stdout)["plan"]
    assert "deadline ran out" in plan["remote_unknown"] and url in plan["remote_unknown"]


@pytest.mark.parametrize("where", ["headers", "body"])
def test_every_request_has_the_answer_deadline_outside_a_step_too(hub: HubServer, where: str) -> None:
    """The upload step has no overall deadline; each of its requests still has the answer deadline."""
    import httpx2
    from huggingface_hub.utils import get_session

    with trickling_server(where) as url, hub_timeouts(Timeouts(connect=1, read=1, deadline=0.6)):
        start = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout, match="deadline"):
            get_session().get(url + "/api/whoami-v2").read()
        elapsed = time.monotonic() - start
    assert 0.55 < elapsed < 4, elapsed  # cut at the 0.6 s deadline, not before


def test_a_silent_hub_with_the_default_idle_timeout_is_cut_by_the_deadline(hub: HubServer, converted) -> None:
    """--timeout longer than --deadline: the deadline, not the idle timeout, ends the step."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # accepts (in the backlog) and never answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        result = run_cli(converted(), REPO, "--endpoint", url, "--deadline", "0.6")  # --timeout 60
        elapsed = time.monotonic() - start
    assert result.exit_code == 1 and elapsed < 6, (elapsed, result.output)
    assert f"no usable answer from {url}" in result.stderr and "deadline ran out" in result.stderr


# ---- records holding values of the wrong type -------------------------------------------------------


MALFORMED = [
    ("conversion.json", ["output_files"], 5, "'output_files' is a number (5), expected a list"),
    ("conversion.json", ["source"], 5, "'source' is a number (5), expected an object"),
    ("conversion.json", ["source", "checkpoint_files"], "yes", "'source.checkpoint_files' is a string"),
    ("conversion.json", ["source", "checkpoint_files", 0], None, "'source.checkpoint_files[0]' is null"),
    (
        "conversion.json",
        ["source", "checkpoint_files", 0, "size"],
        "big",
        "'source.checkpoint_files[0].size'",
    ),
    ("verification.json", ["metrics", 0, "passed"], "yes", "'metrics[0].passed' is a string ('yes')"),
    ("verification.json", ["metrics", 0, "passed"], [], "'metrics[0].passed' is a list"),
    ("verification.json", ["metrics"], 5, "'metrics' is a number"),
    ("verification.json", ["source"], [1], "'source' is a list ([1]), expected an object"),
    ("verification.json", ["tolerances"], 5, "'tolerances' is a number"),
    ("verification.json", ["files"], ["a"], "'files' is a list"),
    ("verification.json", ["verdict"], True, "'verdict' is true/false"),
]


@pytest.mark.parametrize(("name", "key", "value", "fragment"), MALFORMED)
@pytest.mark.parametrize("extra", [["--dry-run"], [], ["--allow-unverified", "--card", "replace"]])
def test_malformed_record_types_are_named(hub: HubServer, converted, name, key, value, fragment, extra):
    folder = converted()
    record = json.loads((folder / name).read_text())
    place = record
    for part in key[:-1]:
        place = place[part]
    place[key[-1]] = value
    (folder / name).write_text(json.dumps(record))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = run_cli(folder, REPO, *extra)
    assert result.exit_code == 1, result.output
    assert f"Error: {folder / name}: key {fragment}" in result.stderr and "Hint:" in result.stderr
    assert "Traceback" not in result.output
    assert hub.requests == [] and hub.repos == {}  # refused before anything was sent
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- an exported (Megatron-layout) folder ------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``persimmon-tools export``'s output (OUT/export.json + OUT/NAME/iter_*/mp_rank_*/...)."""
    from persimmon_tools.cli import main

    base = tmp_path_factory.mktemp("exported")
    tar = make_release(base / "rel.tar", ReleaseOptions(seed=0))
    result = CliRunner().invoke(main, ["export", str(tar), str(base / "out")])
    assert result.exit_code == 0, result.output
    return base / "out"


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--allow-unverified"], ["--json"]])
def test_an_exported_folder_is_not_a_converted_folder(hub: HubServer, exported: Path, extra) -> None:
    result = run_cli(exported, REPO, *extra)
    assert result.exit_code == 2, result.output
    assert f"{exported} is not a converted Hugging Face folder: it holds a Megatron release" in result.stderr
    assert "export.json" in result.stderr and "not verified" not in result.stderr
    assert "Hint: convert it first" in result.stderr and hub.requests == []
    if "--json" in extra:
        assert json.loads(result.stdout)["error"]["type"] == "UsageError"
