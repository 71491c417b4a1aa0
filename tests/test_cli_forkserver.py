"""tests/cli_forkserver.py, the test suite's fork server: what its clients run behaves as the real interpreter
and the real console script do (exit codes, signals, standard streams, argv, working directory, environment,
``-W error``, ``-m``, PYTHONPATH), the real ones being the oracle, run beside it on the same input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_forkserver import import_key
from forkserver_clients import cli_path, write_shim

CASES = {
    "argv, cwd, environment, stdin, exit code": (
        [
            "-c",
            "import os, sys; print(sys.argv, os.getcwd(), os.environ['CASE'], sys.stdin.read()); sys.exit(3)",
        ],
        "a line on stdin",
    ),
    "uncaught exception": (["-c", "import sys\nprint('out')\nraise ValueError('boom')"], ""),
    "SystemExit with a message": (["-c", "raise SystemExit('no luck')"], ""),
    "ended by a signal": (["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], ""),
    "-W error turns a warning into an error": (
        ["-W", "error", "-c", "import warnings; warnings.warn('old', DeprecationWarning); print('not here')"],
        "",
    ),
    "a warning without -W error": (
        ["-c", "import warnings; warnings.warn('shown', UserWarning); print('goes on')"],
        "",
    ),
    "-m with stdin": (["-m", "json.tool", "--sort-keys"], '{"b": 1, "a": [1, 2]}'),
    "an option it leaves to the real interpreter": (["-u", "-c", "print('unbuffered')"], ""),
    "atexit and a non-daemon thread": (
        [
            "-c",
            "import atexit, threading, time\n"
            "atexit.register(print, 'atexit ran')\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread ran'))).start()\n"
            "print('main ran')",
        ],
        "",
    ),
}


def _both(background, args: list[str], stdin: str, cwd: Path, env: dict[str, str]):
    """(the fork server's client, the real interpreter) on the same input."""
    ran = []
    for python in (background.python(), sys.executable):
        done = subprocess.run(
            [python, *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env, timeout=120
        )
        ran.append((done.returncode, done.stdout, done.stderr))
    return ran


@pytest.mark.parametrize("case", list(CASES))
def test_the_python_client_behaves_as_the_interpreter(background, tmp_path, case):
    if background.python() == sys.executable:
        pytest.skip("the fork server did not start here (its clients then are the real interpreter)")
    args, stdin = CASES[case]
    env = dict(background.environ, CASE=case)
    forked, real = _both(background, args, stdin, tmp_path, env)
    assert forked == real


def test_a_script_gets_its_folder_on_sys_path_and_pythonpath_is_applied(background, tmp_path):
    if background.python() == sys.executable:
        pytest.skip("the fork server did not start here")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helper_from_pythonpath.py").write_text("VALUE = 'from PYTHONPATH'\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "sibling.py").write_text("VALUE = 'beside the script'\n")
    script = tmp_path / "app" / "main.py"
    script.write_text(
        "import sys, sibling, helper_from_pythonpath\n"
        "print(sys.argv, __file__, __name__, sibling.VALUE, helper_from_pythonpath.VALUE)\n"
    )
    env = dict(background.environ, PYTHONPATH=str(tmp_path / "lib"))
    forked, real = _both(background, [str(script), "x"], "", tmp_path, env)
    assert forked == real and forked[0] == 0, forked


def test_each_import_environment_gets_the_libraries_settings_of_its_own(background, tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE when it is imported: a request with another value must not get
    a child that imported it with the session's."""
    if background.python() == sys.executable:
        pytest.skip("the fork server did not start here")
    code = ["-c", "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE, c.HF_HOME)"]
    seen = set()
    for offline, home in (("1", tmp_path / "a"), ("0", tmp_path / "b")):
        env = dict(background.environ, HF_HUB_OFFLINE=offline, HF_HOME=str(home))
        forked, real = _both(background, code, "", tmp_path, env)
        assert forked == real and forked[0] == 0, forked
        seen.add(forked[1])
    assert len(seen) == 2
    assert import_key({"HF_HOME": "/x", "PATH": "/bin"}) != import_key({"HF_HOME": "/y", "PATH": "/bin"})
    assert import_key({"HF_HOME": "/x", "PATH": "/bin"}) == import_key({"HF_HOME": "/x", "PATH": "/usr"})


def test_the_cli_client_gives_the_console_scripts_bytes_and_exit_code(background, tmp_path):
    env = dict(background.environ, PATH=cli_path(background, background.scratch_root))
    real = str(Path(sys.executable).parent / "persimmon-tools")
    ran = []
    for command in ("persimmon-tools", real):
        done = subprocess.run(
            [command, "inspect", str(tmp_path / "missing.tar")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        ran.append((done.returncode, done.stdout, done.stderr))
    assert ran[0] == ran[1] and ran[0][0] != 0, ran


def test_without_a_server_the_clients_run_the_real_ones(tmp_path):
    python = write_shim(tmp_path, tmp_path / "nobody-listens", "python")
    done = subprocess.run(
        [str(python), "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and Path(done.stdout.strip()) == Path(sys.executable), done.stderr
    cli = write_shim(tmp_path, tmp_path / "nobody-listens")
    done = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "persimmon-tools" in done.stdout, done.stderr


def test_a_signal_death_reaches_the_caller_as_the_same_signal(background, tmp_path):
    if background.python() == sys.executable:
        pytest.skip("the fork server did not start here")
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    done = subprocess.run([background.python(), "-c", code], env=dict(os.environ), timeout=60)
    assert done.returncode == -signal.SIGTERM
