"""Paths, as every command takes them: compared by identity, not as strings; bytes that are not UTF-8
refused up front; a path through a file named; the --json-file destination checked before the work; names
of 250 bytes; and no parent folders left behind by a failing command (issue 22, part D).

Each test runs the command in-process (CliRunner on ``persimmon_tools.cli.main``) and checks the exit
code, the ``Error:`` text and, with an outside oracle (file hashes, directory listings, tar/JSON readers),
that nothing was lost or left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from persimmon_tools.cli import main
from persimmon_tools.errors import ConversionError, PersimmonToolsError
from persimmon_tools.safe_write import NAME_MAX, atomic_file, relation, temp_stem
from persimmon_tools.staged_output import claim_output, created_folders
from persimmon_tools.staged_record import OutputKind
from persimmon_tools.synth.build import ReleaseOptions, make_release

REPO = Path(__file__).resolve().parent.parent
SP_MODEL = REPO / "tests" / "data" / "sentencepiece_test_model.model"
FAST = ("--no-verify", "--no-tokenizer")
BAD = os.fsdecode(b"\xff")  # how Python shows a file name byte that is not UTF-8: "\udcff"


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def json_error(result) -> dict:
    """The one JSON document a failing ``--json`` command prints: its error object."""
    return json.loads(result.stdout)["error"]


@contextlib.contextmanager
def bind_mount(src: Path, dst: Path) -> Iterator[Path]:
    dst.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("bind mount variant: mount(8) is not installed (the symlink variant runs)")
    done = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(
            "bind mount variant: `mount --bind` is not permitted here (needs root or CAP_SYS_ADMIN; "
            f"{done.stderr.strip() or done.returncode}); the symlink variant runs"
        )
    try:
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], capture_output=True, timeout=30)


@pytest.fixture(params=["symlink", "bind"])
def alias(request, tmp_path) -> Iterator[tuple[Path, Path]]:
    """``(V, D)``: one folder seen under two paths, through a symlinked folder or a bind mount."""
    real = tmp_path / "V"
    real.mkdir()
    if request.param == "symlink":
        (tmp_path / "D").symlink_to(real, target_is_directory=True)
        yield real, tmp_path / "D"
    else:
        with bind_mount(real, tmp_path / "D") as other:
            yield real, other


@pytest.fixture(scope="module")
def toolkit_tar(tmp_path_factory) -> Path:
    """A tarball persimmon-tools wrote (it carries its record: ``--force`` may replace such a tarball)."""
    return make_release(tmp_path_factory.mktemp("own") / "rel.tar", ReleaseOptions(seed=0))


# ---- 1. paths compared by identity ----------------------------------------------------------------------


def test_relation_is_by_identity(alias, tmp_path):
    real, other = alias
    (real / "sub").mkdir()
    (real / "sub" / "f").write_text("x")
    assert relation(other / "sub" / "f", real / "sub" / "f") == "is"
    assert relation(other / "sub", real / "sub" / "f") == "contains"
    assert relation(other / "sub" / "new" / "x", real) == "inside"
    assert relation(tmp_path / "elsewhere", real) is None
    assert relation(other / "sub" / "f", tmp_path / "missing") is None


def test_a_tarball_output_that_is_the_source_is_refused_by_the_staged_output(alias, toolkit_tar):
    """The shared check export must call (``protected`` of ``claim_output``): by identity, so a bind
    mount is caught too; nothing is written and the source is intact."""
    real, other = alias
    shutil.copy(toolkit_tar, real / "rel.tar")
    before = sha(real / "rel.tar")
    kind = OutputKind(label="OUT", error=ConversionError, run="export", command="export --tar", tar=True)
    with (
        pytest.raises(ConversionError, match=r"OUT .*rel\.tar is SOURCE .*replacing OUT would delete it"),
        claim_output(other / "rel.tar", kind, force=True, protected=[("SOURCE", real / "rel.tar")]),
    ):
        pytest.fail("claimed")
    assert sha(real / "rel.tar") == before and listing(real) == ["rel.tar"]


def test_export_tar_force_onto_its_own_source_through_a_symlinked_folder(tmp_path, toolkit_tar):
    real = tmp_path / "V"
    real.mkdir()
    (tmp_path / "D").symlink_to(real, target_is_directory=True)
    shutil.copy(toolkit_tar, real / "rel.tar")
    before = sha(real / "rel.tar")
    result = cli("export", real / "rel.tar", tmp_path / "D" / "rel.tar", "--tar", "--force")
    assert result.exit_code == 2, result.output
    assert "Error: OUT" in result.stderr and "SOURCE" in result.stderr and "Hint:" in result.stderr
    assert sha(real / "rel.tar") == before and listing(real) == ["rel.tar"]


def test_export_tar_force_onto_its_own_source_through_a_bind_mount(tmp_path, toolkit_tar):
    real = tmp_path / "V"
    real.mkdir()
    shutil.copy(toolkit_tar, real / "rel.tar")
    before = sha(real / "rel.tar")
    with bind_mount(real, tmp_path / "D") as other:
        result = cli("export", real / "rel.tar", other / "rel.tar", "--tar", "--force")
        after = sha(real / "rel.tar")
    assert after == before, "the source tarball was replaced"
    assert result.exit_code == 2 and "SOURCE" in result.stderr and "Hint:" in result.stderr


def test_convert_out_dir_containing_source_under_another_name(alias, releases):
    real, other = alias
    (real / "hf").mkdir()
    shutil.copy(releases["tar"], real / "hf" / "rel.tar")
    before = sha(real / "hf" / "rel.tar")
    result = cli("convert", other / "hf" / "rel.tar", real / "hf", "--force", *FAST)
    assert result.exit_code == 1, result.output
    assert "contains SOURCE" in result.stderr and "would delete it" in result.stderr
    assert sha(real / "hf" / "rel.tar") == before and listing(real) == ["hf", "hf/rel.tar"]


def test_unpack_dest_containing_the_tarball_under_another_name(alias, releases):
    """DEST, the tarball's own folder under another name, is an existing folder, so the release goes into
    DEST/NAME beside the tarball (docs/format.md), which stays as it was."""
    real, other = alias
    (real / "x").mkdir()
    shutil.copy(releases["tar"], real / "x" / "rel.tar")
    before = sha(real / "x" / "rel.tar")
    result = cli("unpack", real / "x" / "rel.tar", other / "x", "--no-md5")
    assert result.exit_code == 0, result.output
    assert sha(real / "x" / "rel.tar") == before
    assert "x/rel.tar" in listing(real) and any(p.startswith("x/tiny_release/") for p in listing(real))


def test_verify_json_file_that_is_the_reference_under_another_name(alias, releases, converted_tiny):
    real, other = alias
    shutil.copy(releases["tar"], real / "rel.tar")
    before = sha(real / "rel.tar")
    result = cli("verify", converted_tiny, "-r", real / "rel.tar", "--json-file", other / "rel.tar", "--json")
    assert result.exit_code == 2, result.output
    assert "is the --reference file" in json_error(result)["message"]
    assert sha(real / "rel.tar") == before and listing(real) == ["rel.tar"]


# ---- 2. bytes that are not UTF-8, refused up front by every command ----------------------------------


@pytest.fixture
def undecodable(tmp_path, releases, converted_tiny) -> dict[str, Path]:
    work = tmp_path / "work"
    work.mkdir()
    bad_tar = work / f"rel{BAD}.tar"
    shutil.copy(releases["tar"], bad_tar)
    corpus = work / f"corpus{BAD}.txt"
    corpus.write_text("hello\n")
    return {"work": work, "tar": bad_tar, "corpus": corpus, "good": releases["tar"], "hf": converted_tiny}


CASES = {
    "convert SOURCE": lambda p: ["convert", p["tar"], p["work"] / "out", *FAST],
    "convert OUT_DIR": lambda p: ["convert", p["good"], p["work"] / f"o{BAD}", *FAST],
    "verify --reference": lambda p: ["verify", p["hf"], "-r", p["tar"]],
    "verify --json-file": lambda p: [
        "verify",
        p["hf"],
        "-r",
        p["good"],
        "--json-file",
        p["work"] / f"r{BAD}",
    ],
    "tokenizer OUT_DIR": lambda p: ["tokenizer", SP_MODEL, p["work"] / f"t{BAD}"],
    "tokenizer --check corpus": lambda p: ["tokenizer", "--check", SP_MODEL, p["corpus"]],
    "inspect": lambda p: ["inspect", p["tar"], "--no-tensors"],
    "unpack": lambda p: ["unpack", p["tar"], p["work"] / "dest", "--no-md5"],
    "make-release": lambda p: ["make-release", p["work"] / f"m{BAD}.tar"],
    "export": lambda p: ["export", p["good"], p["work"] / f"e{BAD}"],
    "push REPO_ID": lambda p: ["push", p["hf"], f"me/m{BAD}", "--dry-run"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_non_utf8_path_bytes_are_a_usage_error_with_json(undecodable, case):
    before = listing(undecodable["work"])
    hf_before = listing(undecodable["hf"])
    result = cli(*CASES[case](undecodable), "--json")
    assert result.exit_code == 2, result.output
    error = json_error(result)  # the JSON error object comes out (stdout was empty before)
    assert error["type"] == "UsageError" and error["exit_code"] == 2
    assert "that is valid UTF-8, but it holds byte 0xff" in error["message"] and "\\xff" in error["message"]
    assert "Error:" in result.stderr and "Hint:" in result.stderr and "Traceback" not in result.output
    assert listing(undecodable["work"]) == before and listing(undecodable["hf"]) == hf_before


# ---- 3. a path through a regular file ---------------------------------------------------------------


PAST_A_FILE = {
    "convert": (lambda f: ["convert", "{tar}", f / "out", *FAST], 1),
    "export": (lambda f: ["export", "{tar}", f / "out"], 1),
    "export --tar": (lambda f: ["export", "{tar}", f / "out.tar", "--tar"], 1),
    "unpack": (lambda f: ["unpack", "{tar}", f / "dest", "--no-md5"], 1),
    "make-release": (lambda f: ["make-release", f / "sub" / "r.tar"], 1),
    "tokenizer": (lambda f: ["tokenizer", SP_MODEL, f / "out"], 1),
    "verify --json-file": (lambda f: ["verify", "{hf}", "-r", "{tar}", "--json-file", f / "r.json"], 2),
}


@pytest.mark.parametrize("case", list(PAST_A_FILE))
def test_a_path_through_a_file_names_the_file(tmp_path, releases, converted_tiny, case):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    make, code = PAST_A_FILE[case]
    args = [str(a).format(tar=releases["tar"], hf=converted_tiny) for a in make(notes)]
    result = cli(*args)
    assert result.exit_code == code, result.output
    assert f"{notes} is a file, not a folder" in result.stderr and "Hint:" in result.stderr
    assert "File exists" not in result.stderr and "Traceback" not in result.output
    assert notes.read_text() == "mine\n" and listing(tmp_path) == ["notes.txt"]


# ---- 4. the --json-file destination, before any work ---------------------------------------------------


def test_json_file_in_a_missing_folder_is_refused_before_verify_runs(tmp_path, releases, converted_tiny):
    hf_before = {p: sha(converted_tiny / p) for p in listing(converted_tiny)}
    result = cli("verify", converted_tiny, "-r", releases["tar"], "--json-file", tmp_path / "nope" / "r.json")
    assert result.exit_code == 2, result.output
    assert f"--json-file {tmp_path / 'nope' / 'r.json'}: the folder {tmp_path / 'nope'} does not exist" in (
        result.stderr
    )
    assert ".partial" not in result.stderr and "mkdir -p" in result.stderr  # names no temporary file
    assert {p: sha(converted_tiny / p) for p in listing(converted_tiny)} == hf_before  # verify did not run
    assert listing(tmp_path) == []


def test_json_file_that_is_a_folder_or_a_link_or_inside_out_dir(tmp_path, releases, converted_tiny):
    (tmp_path / "target.json").write_text("theirs")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    cases = {
        tmp_path: "--json-file",  # a folder: click's own check
        tmp_path / "link.json": "is a symbolic link",
        converted_tiny / "extra.json": "is inside OUT_DIR",
    }
    for path, fragment in cases.items():
        result = cli("verify", converted_tiny, "-r", releases["tar"], "--json-file", path)
        assert result.exit_code == 2, result.output
        assert fragment in result.stderr and "Hint:" in result.stderr
    assert (tmp_path / "target.json").read_text() == "theirs" and not (converted_tiny / "extra.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder: no unwritable folder to test")
def test_json_file_in_an_unwritable_folder(tmp_path, releases, converted_tiny):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = cli("verify", converted_tiny, "-r", releases["tar"], "--json-file", locked / "r.json")
    assert result.exit_code == 2 and "is not writable" in result.stderr
    assert listing(locked) == []


# ---- 5. names of 250 bytes ---------------------------------------------------------------------------


def test_temp_stem_fits_and_is_stable():
    for name in ["a" * 250, "é" * 125, "x" * 200, "short"]:
        stem = temp_stem(name)
        assert stem == temp_stem(name) and len(os.fsencode(f".{stem}.tmp-{'0' * 16}-abcdefgh")) <= NAME_MAX
    assert temp_stem("short") == "short" and temp_stem("a" * 250) != temp_stem("a" * 249 + "b")
    assert temp_stem("é" * 125).encode("utf-8")  # cut between characters, never inside one


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_250_byte_output_name_converts_replaces_and_recovers(tmp_path, releases):
    name = "n" * 250
    out = tmp_path / name
    result = cli("convert", releases["tar"], out, *FAST)
    assert result.exit_code == 0, result.output
    assert listing(tmp_path)[0] == name and (out / "conversion.json").is_file()
    # a killed run's leftover, named as the toolkit names it for this output: recognised and removed
    token = "0123456789abcdef"
    leftover = tmp_path / f".{temp_stem(name)}.tmp-{token}-abcdefgh"
    leftover.mkdir()
    marker = {"tool": "persimmon-tools", "pid": _dead_pid(), "token": token, "role": "new"}
    (leftover / ".persimmon-tools-run.json").write_text(json.dumps(marker))
    result = cli("convert", releases["tar"], out, "--force", *FAST)
    assert result.exit_code == 0, result.output
    assert "temporary folder of an interrupted run" in result.stderr
    assert os.listdir(tmp_path) == [name]  # no lock, temp or leftover beside it
    assert json.loads((out / "conversion.json").read_text())["tool"] == "persimmon-tools"


def test_a_250_byte_tarball_and_report_name(tmp_path, converted_tiny, releases):
    tar = tmp_path / ("t" * 246 + ".tar")
    for extra in ([], ["--force"]):
        result = cli("make-release", tar, *extra)
        assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path) == [tar.name]
    report = tmp_path / ("r" * 245 + ".json")
    with atomic_file(report, "report", PersimmonToolsError) as fh:
        fh.write(b"{}")
    assert report.read_bytes() == b"{}" and sorted(os.listdir(tmp_path)) == sorted([tar.name, report.name])


# ---- 6. no parent folders left behind by a failing command ------------------------------------------


def test_failing_convert_removes_the_parents_it_made(tmp_path, releases):
    (tmp_path / "keep").mkdir()
    result = cli("convert", releases["tar"], tmp_path / "keep" / "a" / "b" / "out", "--drop-key", "nothing.*")
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and listing(tmp_path) == ["keep"]


@pytest.mark.parametrize("tar", [False, True])
def test_failing_export_removes_the_parents_it_made(tmp_path, releases, monkeypatch, tar):
    import persimmon_tools.export.export as export

    def disk_fails(*args, **kwargs):
        raise ConversionError("simulated write failure", hint="test")

    monkeypatch.setattr(export, "write_release_tar" if tar else "write_release_folder", disk_fails)
    out = tmp_path / "a" / "b" / ("out.tar" if tar else "out")
    result = cli("export", releases["tar"], out, *(["--tar"] if tar else []))
    assert result.exit_code == 1 and "Error: simulated write failure" in result.stderr
    assert listing(tmp_path) == []


def test_created_folders_removes_only_its_own_empty_ones(tmp_path):
    kind = OutputKind(label="OUT", error=ConversionError, run="test")
    (tmp_path / "had").mkdir()
    with pytest.raises(RuntimeError), created_folders(tmp_path / "had" / "x" / "y" / "out", kind):
        (tmp_path / "had" / "x" / "theirs.txt").write_text("someone else's")
        raise RuntimeError("failed")
    assert listing(tmp_path) == ["had", "had/x", "had/x/theirs.txt"]  # y and out went, x is not empty
    with created_folders(tmp_path / "new" / "out", kind):
        pass
    assert (tmp_path / "new" / "out").is_dir()  # success keeps them
