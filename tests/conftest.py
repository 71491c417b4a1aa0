"""Shared fixtures: synthetic releases built once per session with the toolkit's own generator, and the
session's ``background``: work that runs in child processes beside the tests."""

from __future__ import annotations

import os

# The suite runs child processes beside the tests (``background`` below) and many tests start a converter
# child of their own: two processes on two cores. torch's default of one OpenMP thread per core makes each
# process's workers spin against the other's; one thread each costs a fifth less CPU for the whole suite
# (docs/performance.md, "Test suite"). Set before torch is imported, so that children inherit it too; an
# OMP_NUM_THREADS set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import compileall  # noqa: E402
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import offload
import pytest
from forkserver_clients import python_path

from persimmon_tools.synth.build import ReleaseOptions, build_release, make_release, write_release_folder

REPO = Path(__file__).resolve().parent.parent
FIXTURE_TAR = REPO / "fixtures" / "tiny_release.tar"
SHARED_DATA = REPO.parent / "shared" / "data"

# The suite starts about a hundred Python children that import the package (the CLI, docs examples, oracles).
# Where PYTHONDONTWRITEBYTECODE is set (some machines set it; the docs examples' environment does) nothing
# writes the package's bytecode, so each child compiled it from source again: ~0.3 s of CPU per child
# (docs/performance.md, "Test suite"). It is compiled once here, into the ``__pycache__`` folders Python
# itself writes where it may (git ignores them); a read-only checkout is left as it is.
compileall.compile_dir(REPO / "persimmon_tools", quiet=2)
# For the same reason pytest caches the test modules' rewritten bytecode (``__pycache__/*-pytest-*.pyc``)
# only where bytecode may be written: under PYTHONDONTWRITEBYTECODE the session and each of its child pytests
# (tests/offload.py) rewrote and compiled every test module again, ~4 CPU-seconds a session. This process
# writes them (children keep the environment's setting, and read what is written).
sys.dont_write_bytecode = False


@pytest.fixture(scope="session")
def releases(tmp_path_factory) -> dict[str, Path]:
    """Tiny releases (seed 0) in several layouts: tar TP1, TP2, PP2, TP2xPP3, and an extracted folder."""
    base = tmp_path_factory.mktemp("releases")
    out = {"tar": base / "tiny_release.tar"}
    shutil.copy(FIXTURE_TAR, out["tar"])
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("tp2pp3", 2, 3)):
        out[name] = make_release(base / f"{name}_release.tar", ReleaseOptions(tp=tp, pp=pp, seed=0))
    out["folder"] = write_release_folder(build_release(seed=0), base / "tiny_folder_release")
    return out


@pytest.fixture(scope="session")
def converted_tiny(releases, tmp_path_factory) -> Path:
    """The tiny fixture converted once with default options (no verify)."""
    from persimmon_tools.conversion.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("converted") / "tiny-hf"
    convert(releases["tar"], out, ConvertOptions())
    return out


def default_signals(args: list[str], names: tuple[str, ...] = ("SIGINT",)) -> list[str]:
    """``args`` (a Python child: ``[sys.executable, ...]``) started with the signals ``names`` at their
    default disposition.

    A shell's background jobs inherit SIGINT (and SIGQUIT) ignored, ``nohup`` SIGHUP, and an ignored signal
    stays ignored across ``exec`` (the toolkit keeps it so: nohup's contract); a test of what the signal does
    needs the default. A small launcher restores them and execs the child (instead of a ``preexec_fn``,
    which is unsafe in the threads that run background jobs)."""
    launcher = (
        "import os, signal, sys; "
        f"[signal.signal(getattr(signal, n), signal.SIG_DFL) for n in {list(names)!r}]; "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", launcher, *args]


class Background:
    """Jobs that spend their time in child processes, run by worker threads beside the tests.

    pytest runs the tests in one process, on one core; on a machine with two, the other one idles except
    while a test waits for a child. A job ``fn(background, *args)`` (``submit``) runs in a worker thread
    and starts its children with ``run``: a child is a fresh process, in its own process group (so ``close``
    kills whatever it started), given an absolute ``cwd`` (a test may chdir meanwhile) and, as its
    environment, what the job builds from ``environ``: ``os.environ`` as it was when the session began, so
    that what a test sets with monkeypatch meanwhile does not leak into it. Nothing else of a job should touch
    the process's shared state. The tests wait for the job's future, then check its answer as before.

    One worker takes the jobs in the order they were submitted; a test that waits for a job raises the
    number of workers (``add_workers``), since pytest's own process then waits too."""

    def __init__(self, scratch_root: Path) -> None:
        self.scratch_root = scratch_root  # the session's base temporary folder
        self.environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        self._lock = threading.Lock()
        self._queue: list[tuple[Future, Callable, tuple]] = []
        self._running: set[subprocess.Popen] = set()
        self._workers: list[threading.Thread] = []
        self._closed = False
        self.started: dict[str, object] = {}  # what was started at session start, by name
        self.offloaded: set[str] = set()  # node ids run in a child pytest (tests/offload.py)
        self._memory: Path | bool | None = None  # roomy_scratch's folder in /dev/shm (False: none)

    # for test modules, which cannot import this file reliably (``conftest`` is whichever pytest loaded last)
    default_signals = staticmethod(default_signals)

    def python(self) -> str:
        """The interpreter for a child whose test is about what its code computes, not about a fresh
        interpreter's start: the fork server's ``python`` client (tests/forkserver_clients.py), else this one."""
        return python_path(self, self.scratch_root)

    def roomy_scratch(self, name: str) -> Path:
        """A new folder for the ``mid`` release and its conversions (~5 GiB written in a session): on the
        memory filesystem /dev/shm when it has room to spare, where writing costs the kernel about half the CPU
        of a disk's page cache and writeback, else under the session's base folder. Removed when the
        session ends."""
        with self._lock:
            if self._memory is None:
                self._memory = _memory_root()
        if self._memory is False:
            return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch_root))
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self._memory))

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._lock:
            self._queue.append((future, fn, args))
        return future

    def add_workers(self, total: int) -> Background:
        """Let up to ``total`` jobs run at a time (a worker ends when it finds no job: call this again after
        ``submit``, before waiting for the job)."""
        with self._lock:
            self._workers = [w for w in self._workers if w.is_alive()]
            while len(self._workers) < total:
                worker = threading.Thread(target=self._work, name="tests-background", daemon=True)
                self._workers.append(worker)
                worker.start()
        return self

    def run(
        self, args: list[str], *, cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """``subprocess.run(args, capture_output=True, text=True, ...)``, killed with its process group on
        timeout (``subprocess.TimeoutExpired``) or when the session ends first (``RuntimeError``)."""
        with self.spawn(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                raise
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

    @contextlib.contextmanager
    def spawn(
        self, args: list[str], *, cwd: Path, env: dict[str, str], **popen
    ) -> Iterator[subprocess.Popen]:
        """``subprocess.Popen(args, cwd=cwd, env=env, **popen)`` for a job that talks to its child (reads its
        output as it comes, sends it signals), in a process group of its own: killed with the group when the
        block ends and it still runs, or when the session ends first (then ``RuntimeError`` for a new one).
        No ``preexec_fn`` (unsafe in a thread): :func:`default_signals` gives a child the default dispositions."""
        proc = self.keep(args, cwd=cwd, env=env, **popen)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.communicate()
            with self._lock:
                self._running.discard(proc)

    def keep(self, args: list[str], *, cwd: Path, env: dict[str, str], **popen) -> subprocess.Popen:
        """A child in its own process group, killed when the session ends (``RuntimeError`` once it has): a
        long-lived one (a server the jobs use) as it is, the others through :meth:`spawn`."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"not run, the test session ended first: {args}")
            proc = subprocess.Popen(args, cwd=cwd, env=env, start_new_session=True, **popen)
            self._running.add(proc)
        return proc

    def start_for(self, items: list, fixture: str, key: str, fn: Callable, *args) -> None:
        """Submit ``fn(background, *args)`` under ``key`` when a selected test (``items``) uses ``fixture``:
        for a module-scoped fixture whose value is what a job returns (it waits with :meth:`result`)."""
        if any(fixture in item.fixturenames for item in items):
            self.started[key] = self.submit(fn, *args)

    def converted_tiny(self, tmp_path_factory) -> Future:
        """The bundled tiny release converted with default options (no verify) in a child, as the
        ``converted_tiny`` fixture does: one job per session whose folder the jobs that need it read and never
        change (submit them after calling this: one worker takes the jobs in order)."""
        if "converted_tiny" not in self.started:
            out = tmp_path_factory.mktemp("converted-in-a-child") / "tiny-hf"
            self.started["converted_tiny"] = self.submit(_convert_tiny, out)
        return self.started["converted_tiny"]

    def result(self, key: str) -> object:
        """What the job started under ``key`` returned (raised), waited for with a second worker beside it; a
        job still queued moves to the front, so that worker takes it next (pytest's own process waits)."""
        future = self.started[key]
        with self._lock:
            queued = [job for job in self._queue if job[0] is future]
            for job in queued:
                self._queue.remove(job)
                self._queue.insert(0, job)
        return self.add_workers(2).started[key].result()

    def close(self) -> None:
        """No further job or child starts; running children are killed; the workers are waited for."""
        with self._lock:
            self._closed = True
            for proc in self._running:
                _kill_group(proc)
        for worker in self._workers:
            worker.join()
        if isinstance(self._memory, Path):
            shutil.rmtree(self._memory, ignore_errors=True)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._queue:
                    return
                future, fn, args = self._queue.pop(0)
            try:
                future.set_result(fn(self, *args))
            except BaseException as err:  # the test that waits for it raises it
                future.set_exception(err)


#: /dev/shm, and the memory it takes its pages from, must keep this much free besides what the session
#: writes there (up to ~3 GiB at a time).
_MEMORY_SPARE = 8 << 30
_MEMORY_PREFIX = "persimmon-tools-tests-"


def _memory_root() -> Path | bool:
    """A folder of this session's in /dev/shm when that is a memory filesystem with room to spare, else
    False. Folders that earlier sessions left there (killed before they could remove them) go first."""
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError, IndexError, ValueError):
        mounts = Path("/proc/mounts").read_text().split("\n")
        if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts if line.strip()):
            return False
        for stale in shm.glob(f"{_MEMORY_PREFIX}*"):
            pid = stale.name.removeprefix(_MEMORY_PREFIX)
            if pid.isdigit() and not Path(f"/proc/{pid}").exists() and stale.stat().st_uid == os.getuid():
                shutil.rmtree(stale, ignore_errors=True)
        room = os.statvfs(shm)
        memory = Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]  # kB
        if min(room.f_bavail * room.f_frsize, int(memory) << 10) < _MEMORY_SPARE + (6 << 30):
            return False
        root = shm / f"{_MEMORY_PREFIX}{os.getpid()}"
        root.mkdir(mode=0o700)
        return root
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.returncode is None:  # not reaped yet, so its pid (and group id) is still its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _selected(item: pytest.Item) -> bool:
    """False for a test that a ``skipif(True)`` mark (e.g. no CUDA) will skip."""
    return not any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif"))


_MAKE_MID = (
    "import sys; from pathlib import Path; "
    "from persimmon_tools.synth.build import ReleaseOptions, make_release; "
    "make_release(Path(sys.argv[1]), ReleaseOptions(preset='mid', seed=0))"
)


_CONVERT_TINY = (
    "import sys; from pathlib import Path; from persimmon_tools.conversion.convert import ConvertOptions, "
    "convert; convert(Path(sys.argv[1]), Path(sys.argv[2]), ConvertOptions())"
)


def _convert_tiny(background: Background, out: Path) -> Path:
    done = background.run(
        [background.python(), "-c", _CONVERT_TINY, str(FIXTURE_TAR), str(out)],
        cwd=REPO,
        env=background.environ,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"converting the tiny release failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return out


def _make_mid(background: Background, path: Path) -> Path:
    done = background.run(
        [background.python(), "-c", _MAKE_MID, str(path)], cwd=REPO, env=background.environ, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"building the mid release failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return path


_SESSION_BACKGROUND: Background | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """A test that tests/offload.py ran in a child pytest is reported from the child's reports."""
    bg = _SESSION_BACKGROUND
    if bg is not None and item.nodeid in bg.offloaded and offload.replay(item, nextitem, bg):
        return True
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In tests/offload.py's child: every report goes to the file the session reads."""
    if offload.child_reports and _CONFIG is not None:
        offload.write_report(_CONFIG, report)


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has set up the session's base folder
def pytest_configure(config: pytest.Config) -> None:
    """Record the config; in a run of whole folders (the suite), make the session's :class:`Background` now
    and start the fork server and its warm child (tests/cli_forkserver.py) beside the collection, which
    otherwise has the second core to itself."""
    global _CONFIG, _SESSION_BACKGROUND
    _CONFIG = config
    offload.configure()
    if not offload.child_reports and all(Path(arg).is_dir() for arg in config.args):
        bg = _SESSION_BACKGROUND = Background(config._tmp_path_factory.getbasetemp())
        threading.Thread(target=_warm_up, args=(bg,), name="tests-warm-up", daemon=True).start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_BACKGROUND is not None:
        _SESSION_BACKGROUND.close()


def _warm_up(bg: Background) -> None:
    """One request with the session's environment: the fork server starts, then its warm child for it."""
    with contextlib.suppress(Exception):  # only a head start: the first job does it otherwise
        bg.run([bg.python(), "-c", "pass"], cwd=bg.scratch_root, env=bg.environ, timeout=120)


_CONFIG: pytest.Config | None = None


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory) -> Iterator[Background]:
    """The session's :class:`Background`, with what the selected tests will need started at once, in order:

    - the ``mid`` release, when a test uses ``mid_release``;
    - whatever a test module starts with its ``start_in_background(background, tmp_path_factory, items)``
      (``items``: its selected tests), called for each such module in the order of the session's tests.

    One worker runs them beside the tests from the first test on; it is all child processes."""
    global _SESSION_BACKGROUND
    if _SESSION_BACKGROUND is None:  # not made at configure time (a run of chosen files or tests)
        _SESSION_BACKGROUND = Background(tmp_path_factory.getbasetemp())
    bg = _SESSION_BACKGROUND
    items = [item for item in request.session.items if _selected(item)]
    if any("mid_release" in item.fixturenames for item in items):
        path = bg.roomy_scratch("mid") / "mid_release.tar"
        bg.started["mid_release"] = bg.submit(_make_mid, path)
    chosen = offload.offloaded(items)
    elsewhere = offload.start(bg, tmp_path_factory, chosen) if chosen else set()
    modules: dict[str, tuple[object, list[pytest.Item]]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_in_background") and item.nodeid.split("::", 1)[0] not in elsewhere:
            modules.setdefault(module.__name__, (module, []))[1].append(item)
    for module, its in modules.values():
        module.start_in_background(bg, tmp_path_factory, its)
    yield bg.add_workers(1)
    bg.close()


@pytest.fixture(scope="session")
def mid_release(background, tmp_path_factory) -> Path:
    """The ``mid`` preset (seed 0) as a ~1 GiB release tar, built once per session (started in the
    background when the session begins, see ``background``).

    For the tests whose point is the size: a signal that reliably lands while a shard is being written, and
    a streaming conversion's peak RSS far below the release. Read-only: every user converts it elsewhere."""
    started = background.started.get("mid_release")
    if started is None:  # not foreseen at the start (a test that asks for it by getfixturevalue)
        return make_release(
            tmp_path_factory.mktemp("mid") / "mid_release.tar", ReleaseOptions(preset="mid", seed=0)
        )
    return started.result()


@pytest.fixture
def approximate_charsmap(monkeypatch):
    """Make the tokenizer builder use tokenizers' own grapheme-wise Precompiled normalizer (the pipeline
    before the exact charsmap: dummy prefix after the charsmap), which is wrong on stacked marks and CR LF.
    Call it after building whatever should stay exact."""
    from tokenizers import normalizers

    import persimmon_tools.tokenizer.build as build

    def precompiled_only(blob, users, dummy="", suffix=""):
        return (normalizers.Precompiled(blob), *([normalizers.Prepend(dummy)] if dummy else []))

    return lambda: monkeypatch.setattr(build, "exact_charsmap_steps", precompiled_only)
