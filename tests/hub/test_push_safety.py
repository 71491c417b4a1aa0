"""``push`` sends only the folder's own regular files, and spends bounded time on any network.

Hostile folders (a README.md linked to a file outside, a linked shard, a FIFO) are refused before anything
in them is read, even by ``--dry-run``. A server that accepts connections and never answers, a refused
connection and ``HF_HUB_OFFLINE`` end within seconds; a bad ``--endpoint`` is a usage error (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_server import HubServer

from persimmon_tools.errors import HubError
from persimmon_tools.hub.local import scan_folder
from persimmon_tools.hub.push import PushOptions, push_folder

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "alice/persimmon-8b-chat"
SECRET = "root:x:0:0:SECRET-OUTSIDE-THE-FOLDER"
SHARD = "model-00001-of-00002.safetensors"


def run_cli(*args: str):
    from persimmon_tools.cli import main

    return CliRunner().invoke(main, ["push", *args], catch_exceptions=False)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 whose kernel accepts connections and which never answers a byte."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # handshakes complete in the backlog; nothing ever reads or writes
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def closed_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connections are refused


def _all_output(result) -> str:
    return result.stdout + result.stderr


# ---- only the folder's own regular files -------------------------------------------------------------


def test_readme_linked_outside_is_refused_and_never_read(hub: HubServer, converted, tmp_path: Path) -> None:
    folder = converted()
    secret = tmp_path / "passwd"
    secret.write_text(SECRET + "\n")
    (folder / "README.md").symlink_to(secret)
    for extra in (["--dry-run"], [], ["--dry-run", "--card", "replace", "--allow-unverified"]):
        result = run_cli(str(folder), REPO, "--endpoint", hub.url, *extra)
        assert result.exit_code == 1, _all_output(result)
        assert "SECRET" not in _all_output(result)
        assert "README.md (a symbolic link)" in result.stderr and "Hint:" in result.stderr
    assert hub.requests == [] and hub.repos == {}


def test_linked_shard_is_refused_even_unverified(hub: HubServer, converted, tmp_path: Path) -> None:
    folder = converted()
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / SHARD, outside)
    (folder / SHARD).symlink_to(outside)
    with pytest.raises(HubError, match="link") as err:
        push_folder(
            folder, REPO, PushOptions(endpoint=hub.url, allow_unverified=True, retry_base_delay=0.001)
        )
    assert f"{SHARD} (a symbolic link)" in err.value.message and "cp --remove-destination" in err.value.hint
    assert hub.requests == []


def test_fifo_and_linked_folder_below_are_refused_at_once(hub: HubServer, converted, tmp_path: Path) -> None:
    folder = converted()
    (folder / "extra").mkdir()
    os.mkfifo(folder / "extra" / "pipe")  # a reader would block on it forever
    (folder / "extra" / "etc").symlink_to("/etc", target_is_directory=True)
    start = time.monotonic()
    result = run_cli(str(folder), REPO, "--dry-run", "--allow-unverified")
    assert result.exit_code == 1 and time.monotonic() - start < 10
    assert "extra/pipe (a FIFO" in result.stderr and "extra/etc (a symbolic link)" in result.stderr
    assert "2 link(s) or special file(s)" in result.stderr
    assert hub.requests == []


def test_a_file_swapped_for_a_link_after_the_scan_is_not_uploaded(converted, tmp_path: Path) -> None:
    folder = converted(verified=False)
    scan = scan_folder(folder)
    assert scan.checked_path("config.json") == folder / "config.json"
    (tmp_path / "secret").write_text(SECRET)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(HubError, match="replaced or changed"):
        scan.checked_path("config.json")
    (folder / "new.json").write_text("{}")  # appeared after the scan: not part of the plan
    with pytest.raises(HubError, match="replaced or changed"):
        scan.checked_path("new.json")


def test_normal_push_uploads_exactly_the_regular_files(hub: HubServer, converted) -> None:
    folder = converted()
    result = push_folder(folder, REPO, PushOptions(endpoint=hub.url, retry_base_delay=0.001))
    expected = {p.name for p in folder.iterdir()} | {"README.md"}
    assert set(result.uploaded) == expected
    for name in expected - {"README.md"}:
        assert hub.file(REPO, name) == (folder / name).read_bytes()


# ---- bounded time on the network ---------------------------------------------------------------------


def test_silent_server_dry_run_ends_within_the_deadline(hub: HubServer, converted) -> None:
    folder = converted()
    with silent_server() as url:
        start = time.monotonic()
        result = run_cli(
            str(folder), REPO, "--dry-run", "--endpoint", url, "--timeout", "0.5", "--deadline", "1.5"
        )
        elapsed = time.monotonic() - start
    assert result.exit_code == 0, _all_output(result)
    assert elapsed < 6, elapsed  # the deadline plus one request timeout, plus start-up
    assert "Remote:     unknown" in result.stdout and "deadline" in result.stdout
    assert "state unknown" in result.stdout and "license: cc-by-nc-4.0" in result.stdout  # plan and card


def test_silent_server_push_fails_within_the_deadline(hub: HubServer, converted) -> None:
    with silent_server() as url:
        start = time.monotonic()
        result = run_cli(str(converted()), REPO, "--endpoint", url, "--timeout", "0.5", "--deadline", "1.5")
        elapsed = time.monotonic() - start
    assert result.exit_code == 1 and elapsed < 6, (elapsed, _all_output(result))
    assert "ReadTimeout" in result.stderr and "deadline ran out" in result.stderr and "Hint:" in result.stderr


def test_refused_connection_fails_or_dry_runs_at_once(hub: HubServer, converted) -> None:
    folder, url = converted(), closed_port()
    start = time.monotonic()
    result = run_cli(str(folder), REPO, "--endpoint", url)  # default --max-retries 5: no 33 s of backoff
    assert result.exit_code == 1 and time.monotonic() - start < 3, _all_output(result)
    assert "cannot reach" in result.stderr and "refused" in result.stderr.lower()
    assert "Hint:" in result.stderr and "--dry-run" in result.stderr
    start = time.monotonic()
    result = run_cli(str(folder), REPO, "--endpoint", url, "--dry-run")
    assert result.exit_code == 0 and time.monotonic() - start < 3, _all_output(result)
    assert "Remote:     unknown" in result.stdout and "upload config.json" in result.stdout


def test_offline_mode_fails_or_dry_runs_without_a_request(
    hub: HubServer, converted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    folder = converted()
    start = time.monotonic()
    result = run_cli(str(folder), REPO)
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in result.stderr and "Hint:" in result.stderr
    result = run_cli(str(folder), REPO, "--dry-run")
    assert result.exit_code == 0, _all_output(result)
    assert "unknown, the Hub was not reached (HF_HUB_OFFLINE is set)" in result.stdout
    assert time.monotonic() - start < 3 and hub.requests == []


def test_offline_env_var_dry_run_in_a_real_process(converted, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": closed_port()}
    code = "from persimmon_tools.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "push", str(converted()), REPO, "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stdout and "Model card (README.md" in proc.stdout


@pytest.mark.parametrize("endpoint", ["ftp://x", "localhost:1", "http://", "not a url", "http://h:99999"])
def test_bad_endpoint_is_a_usage_error_before_any_call(hub: HubServer, converted, endpoint: str) -> None:
    result = run_cli(str(converted()), REPO, "--dry-run", "--endpoint", endpoint)
    assert result.exit_code == 2, _all_output(result)
    assert f"--endpoint {endpoint!r} is not a Hub URL" in result.stderr and "Hint:" in result.stderr
    assert "Traceback" not in _all_output(result) and hub.requests == []


def test_bad_hf_endpoint_is_named(hub: HubServer, converted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "ftp://mirror")
    result = run_cli(str(converted()), REPO)
    assert result.exit_code == 2 and "HF_ENDPOINT 'ftp://mirror' is not a Hub URL" in result.stderr


def test_timeouts_are_set_during_a_push_and_restored_after(hub: HubServer, converted) -> None:
    from huggingface_hub.utils import _http

    before = _http._GLOBAL_CLIENT_FACTORY
    push_folder(converted(), REPO, PushOptions(endpoint=hub.url, dry_run=True, timeout=7))
    assert _http._GLOBAL_CLIENT_FACTORY is before


def test_help_says_the_timeouts_and_the_deadline() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--timeout SECONDS" in text and "[default: 60.0; x>0]" in text and "at most 10 s" in text
    assert "--deadline SECONDS" in text and "[default: 120.0; x>0]" in text
    assert "regular files" in text and "Works offline" in text
