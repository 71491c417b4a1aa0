"""FIFOs, huge sparse files, links and malformed records: refused quickly with Error/Hint, never read, never
a traceback (issue 15)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from click.testing import CliRunner
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.errors import ReleaseError
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.build import build_release, bundled_vocab, write_release_folder

SPARSE = 6 << 30  # 6 GiB claimed by truncate, nothing on disk


def _cli(*args, timeout: float = 60):
    start = time.monotonic()
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert time.monotonic() - start < timeout, "the command took too long (did it read or block?)"
    return result


def _sparse(path):
    with open(path, "wb") as fh:
        fh.truncate(SPARSE)
    return path


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.model"
    os.mkfifo(path)
    return path


@pytest.fixture
def release_folder(tmp_path):
    return write_release_folder(build_release(seed=0), tmp_path / "8b_base_model_release")


@pytest.fixture
def converted_copy(converted_tiny, tmp_path):
    out = tmp_path / "converted"
    shutil.copytree(converted_tiny, out)
    return out


# ---- FIFOs where a file is expected --------------------------------------------------------------------


def test_fifo_as_vocab_fails_fast(releases, fifo, tmp_path):
    result = _cli("convert", releases["tar"], tmp_path / "out", "--vocab", fifo, timeout=30)
    assert_clean_failure(result, 1)
    assert "FIFO" in result.stderr and str(fifo) in result.stderr and "Hint:" in result.stderr


def test_fifo_as_tokenizer_input_fails_fast(fifo, tmp_path):
    result = _cli("tokenizer", fifo, tmp_path / "tok", timeout=30)
    assert_clean_failure(result, 1)
    assert "FIFO" in result.stderr and "Hint:" in result.stderr


def test_fifo_as_prompts_file_fails_fast(converted_tiny, releases, fifo):
    result = _cli("verify", converted_tiny, "-r", releases["tar"], "--prompts-file", fifo, timeout=30)
    assert_clean_failure(result, 2)  # a bad --prompts-file is a UsageError, like its other errors
    assert "FIFO" in result.stderr and "--prompts-file" in result.stderr and "Hint:" in result.stderr


# ---- huge sparse files: refused by size, never read ----------------------------------------------------


def test_sparse_tracker_is_refused_without_reading(release_folder):
    tracker = release_folder / "latest_checkpointed_iteration.txt"
    tracker.unlink()
    _sparse(tracker)
    start = time.monotonic()
    with pytest.raises(ReleaseError) as err:
        open_release(release_folder)
    assert time.monotonic() - start < 2
    assert "iteration tracker" in err.value.message and "6.0 GiB" in err.value.message


def test_sparse_vocab_is_refused_without_reading(releases, tmp_path):
    result = _cli("convert", releases["tar"], tmp_path / "out", "--vocab", _sparse(tmp_path / "v.model"))
    assert_clean_failure(result, 1)
    assert "6.0 GiB" in result.stderr and "--vocab" in result.stderr


def test_sparse_tokenizer_input_is_refused(tmp_path):
    result = _cli("tokenizer", _sparse(tmp_path / "v.model"), tmp_path / "tok")
    assert_clean_failure(result, 1)
    assert "6.0 GiB" in result.stderr


def test_sparse_verification_json_is_refused_by_push(converted_copy):
    (converted_copy / "verification.json").unlink(missing_ok=True)
    _sparse(converted_copy / "verification.json")
    result = _cli("push", converted_copy, "me/model", "--dry-run", timeout=30)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.exit_code != 0 and "verification.json" in result.stderr


# ---- links inside folders the toolkit walks ------------------------------------------------------------


def test_symlinked_vocab_inside_release_folder_is_refused(release_folder, tmp_path):
    vocab = release_folder / "adept_vocab.model"
    target = tmp_path / "elsewhere.model"
    vocab.rename(target)
    vocab.symlink_to(target)
    with pytest.raises(ReleaseError) as err:
        open_release(release_folder)
    assert "adept_vocab.model (a symbolic link)" in err.value.message and err.value.hint


def test_symlinked_shard_inside_release_folder_is_refused_by_both_readers(release_folder, tmp_path):
    from persimmon_tools.verification.source_merge import load_source as discover

    shard = next(release_folder.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    target = tmp_path / "elsewhere.pt"
    shard.rename(target)
    shard.symlink_to(target)
    for read in (open_release, discover):
        with pytest.raises(ReleaseError, match="symbolic link"):
            read(release_folder)


def test_vocab_named_by_the_user_may_be_a_link(releases, tmp_path):
    """HF caches hand out links: a top-level path the user names is followed."""
    real = tmp_path / "blobs" / "abc123"
    real.parent.mkdir()
    real.write_bytes(bundled_vocab())
    link = tmp_path / "v.model"
    link.symlink_to(real)
    assert open_release(releases["tar"], vocab=link).vocab.size == len(bundled_vocab())


def test_symlinked_config_inside_converted_folder_is_not_read(converted_copy, tmp_path):
    real = tmp_path / "config.json"
    shutil.move(converted_copy / "config.json", real)
    (converted_copy / "config.json").symlink_to(real)
    result = _cli("inspect", converted_copy)
    assert_clean_failure(result, 1)
    assert "symbolic link" in result.stderr and "config.json" in result.stderr


def test_fingerprint_reports_links_and_fifos(converted_copy):
    from persimmon_tools.conversion.fingerprint import fingerprint_mismatches

    os.mkfifo(converted_copy / "extra.json")
    (converted_copy / "passwd").symlink_to("/etc/passwd")
    problems = fingerprint_mismatches(converted_copy, {})
    assert "extra.json: a FIFO (named pipe), not a regular file (not read)" in problems
    assert "passwd: a symbolic link, not a regular file (not read)" in problems


# ---- malformed JSON records of a converted folder: typed errors, no traceback --------------------------

RECORDS = [
    "config.json",
    "model.safetensors.index.json",
    "conversion.json",
    "verification.json",
    "tokenizer_config.json",
    "generation_config.json",
]
BROKEN = {"syntax": b'{"a": ', "wrong type": b"[1, 2, 3]", "not utf-8": b'{"a": "\xff"}'}


@pytest.mark.parametrize("how", sorted(BROKEN))
@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("command", ["inspect", "verify", "push"])
def test_malformed_record_never_gives_a_traceback(converted_copy, releases, command, record, how):
    """Case malformed-record: every record of a converted folder, garbled, for inspect, verify and push."""
    (converted_copy / record).write_bytes(BROKEN[how])
    if command == "inspect":
        result = _cli("inspect", converted_copy)
    elif command == "verify":
        result = _cli(
            "verify", converted_copy, "-r", releases["tar"], "--no-default-prompts", "--ids", "1,2,3"
        )
    else:
        result = _cli(
            "push", converted_copy, "me/model", "--dry-run", "--allow-unverified", "--license", "apache-2.0"
        )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        assert result.stderr.startswith("Error: ") or "\nError: " in result.stderr, result.stderr
