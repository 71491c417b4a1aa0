"""CLI fuzzing: every command, in-process through click's CliRunner, with malformed files and option values.

Inputs are *recipes* (hypothesis draws plain tuples) that :func:`materialize` turns into files inside the
example's own folder: random bytes, truncated or garbled JSON, empty files, directories where files are
expected, missing paths, a converted folder with one record replaced by garbage; option values are random
text, negative, huge, unicode, or valid. Most examples fail early; a few are valid and do the real work.

Every example must end cleanly: no traceback, ``result.exception`` None or SystemExit, an exit code in
{0, 1, 2, 3, 130}, an ``Error:`` line when it fails, and nothing written outside the example's folder (the
shared inputs and a sentinel folder, which is also the working directory, are snapshotted before/after).

``benchmarks/fuzz_cli.py`` runs the same strategies for many more examples (outside CI).
"""

from __future__ import annotations

import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persimmon_tools.cli import main

OK_EXIT_CODES = {0, 1, 2, 3, 130}
COMMANDS = ["convert", "inspect", "unpack", "make-release", "tokenizer", "verify", "push"]
CI = settings(
    max_examples=int(os.environ.get("PERSIMMON_CLI_FUZZ_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# ---- values --------------------------------------------------------------------------------------------
SPECIAL = [
    "", " ", "-1", "0", "1", "2", "3", "4", "6", "1e3", "0x10", "1_000", "+5", "-0", "٣", "５", "nan", "inf",
    "-inf", "5GB", "2GiB", "500MB", "1.5GB", "1.5", ".5GB", "5 GB", "5gb", "5G", "1B", "0.1B", "200KB",
    "9" * 30, "-" + "9" * 30, "\x00", "\udcff", "é", "漢字", "🙂" * 3, "cuda:0", "cuda:99", "cpu", "gpu", "auto",
    "cuda", "71013,1,2", "1,,2", "-1,2", "1 2 3", "99999999999", "tiny", "bf16", "fp16", "fp32", "int4",
    "hf", "adept", "transformers", "persimmon-tools", "keep", "replace", "*", "[", "language_model.*",
    "http://", "https://127.0.0.1:1", "not a url", "a/b", "me/model", "../x", "-", "--", "-h",
]  # fmt: skip
HEAVY = {"mid", "8b"}  # make-release presets that write ~1 GB / ~19 GB
junk = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
    st.integers(-(10**25), 10**25).map(str),
    st.floats(allow_nan=True).map(str),
).filter(lambda v: v not in HEAVY)

# ---- files ---------------------------------------------------------------------------------------------
VALID_INPUTS = ["release.tar", "converted", "vocab.model", "corpus.txt", "prompts.json", "prompts.txt"]
RECORDS = [
    "config.json", "conversion.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "verification.json", "README.md",
]  # fmt: skip
SUFFIXES = ["", ".tar", ".pt", ".json", ".model", ".txt"]
GARBLED_JSON = [
    "", "{", "[", "{}", "[]", "null", "1", '"x"', "[1, 2]", '["a", 1]', '{"a": NaN}', '{"a": 1e999}',
    '{"hidden_size": -1}', '{"hidden_size": "x"}', "[" * 5000 + "]" * 5000, '{"a":' * 3000,
    '\ufeff{"a": 1}', "\x00\x01", '["ok", "\\ud800"]', '{"architectures": null, "model_type": 5}',
]  # fmt: skip

content = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("json"), st.sampled_from(GARBLED_JSON)),
    st.tuples(st.just("truncated_json"), st.floats(0, 1)),
    st.tuples(st.just("empty")),
    st.tuples(st.just("dir")),
)
path_recipe = st.one_of(
    st.tuples(st.just("input"), st.sampled_from(VALID_INPUTS)),
    st.tuples(st.just("missing")),
    st.tuples(st.just("file"), st.sampled_from(SUFFIXES), content),
    st.tuples(st.just("truncated"), st.sampled_from(["release.tar", "vocab.model"]), st.floats(0, 1)),
    st.tuples(st.just("folder_garbage"), st.sampled_from(RECORDS), content),
)
out_recipe = st.one_of(
    st.just(("out",)),
    st.just(("out",)),
    st.just(("out_file",)),
    st.just(("out_nonempty",)),
    st.just(("out_under_file",)),
    # an existing input as the output: a private copy (outputs never point at the shared inputs)
    path_recipe.map(lambda r: ("copy", r[1]) if r[0] == "input" else r),
)
# a folder the command writes into (verify writes OUT_DIR/verification.json): a private copy of an input
own_folder = path_recipe.map(lambda r: ("copy", r[1]) if r[0] == "input" else r)


@dataclass
class Workspace:
    inputs: Path  # shared, read-only inputs (snapshotted)
    example: Path  # this example's own folder; everything may be written here
    count: int = 0
    made: list[Path] = field(default_factory=list)


def materialize(recipe: tuple, ws: Workspace) -> str:
    """Turn a path recipe into a path inside ``ws.example`` (or one of the shared inputs)."""
    ws.count += 1
    where = ws.example / f"p{ws.count}"
    kind = recipe[0]
    if kind == "input":
        return str(ws.inputs / recipe[1])
    if kind in ("missing", "out"):
        return str(where / "new") if kind == "out" else str(where / "missing")
    if kind == "copy":
        target = where.with_name(where.name + "-" + recipe[1])
        src = ws.inputs / recipe[1]
        shutil.copytree(src, target) if src.is_dir() else shutil.copy(src, target)
        return str(target)
    if kind == "out_file":
        where.write_bytes(b"x")
        return str(where)
    if kind == "out_nonempty":
        where.mkdir()
        (where / "keep.txt").write_text("keep")
        return str(where)
    if kind == "out_under_file":
        where.write_bytes(b"x")
        return str(where / "sub")
    if kind == "file":
        target = where.with_name(where.name + recipe[1])
        _write_content(target, recipe[2], ws)
        return str(target)
    if kind == "truncated":
        data = (ws.inputs / recipe[1]).read_bytes()
        target = where.with_name(where.name + Path(recipe[1]).suffix)
        target.write_bytes(data[: int(len(data) * recipe[2])])
        return str(target)
    if kind == "folder_garbage":
        folder = where.with_name(where.name + "-hf")
        shutil.copytree(ws.inputs / "converted", folder)
        record = folder / recipe[1]
        if record.is_dir():
            shutil.rmtree(record)
        else:
            record.unlink(missing_ok=True)
        _write_content(record, recipe[2], ws)
        return str(folder)
    raise AssertionError(recipe)


def _write_content(target: Path, spec: tuple, ws: Workspace) -> None:
    kind = spec[0]
    if kind == "bytes":
        target.write_bytes(spec[1])
    elif kind == "json":
        target.write_text(spec[1], encoding="utf-8", errors="surrogatepass")
    elif kind == "truncated_json":
        good = (ws.inputs / "converted" / "config.json").read_bytes()
        target.write_bytes(good[: int(len(good) * spec[1])])
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        target.mkdir()


# ---- argv per command ----------------------------------------------------------------------------------
def _opts(*pairs: tuple[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A random subset of options, each with a drawn value (None: a flag)."""
    return st.lists(st.sampled_from(pairs), max_size=5, unique_by=lambda p: p[0]).flatmap(
        lambda chosen: st.tuples(*[st.tuples(st.just(n), v) for n, v in chosen])
    )


P = ("path",)  # marker: the value is a path recipe
flag = st.none()
mostly_true = st.integers(0, 9).map(bool)  # True 90% of the time


def _value(choices: list[str]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(choices), junk)


OPTIONS = {
    "convert": _opts(
        ("--dtype", _value(["auto", "bf16", "fp16", "fp32"])), ("--max-shard-size", _value(["5GB", "200KB"])),
        ("--iteration", _value(["1251"])), ("--drop-key", junk), ("--vocab", path_recipe), ("--force", flag),
        ("--allow-overflow", flag), ("--allow-nonfinite", flag), ("--no-tokenizer", flag),
        ("--allow-ties", flag), ("--no-add-bos", flag), ("--chat", flag), ("--json", flag), ("-q", flag),
    ),
    "inspect": _opts(("--iteration", _value(["1251"])), ("--json", flag), ("--no-tensors", flag)),
    "unpack": _opts(("--no-md5", flag), ("-q", flag), ("--json", flag)),
    "make-release": _opts(
        ("--preset", _value(["tiny"])), ("--tp", _value(["1", "2", "4"])), ("--pp", _value(["1", "2", "3"])),
        ("--dtype", _value(["bf16", "fp16", "fp32"])), ("--seed", _value(["0", "7"])), ("--vocab", path_recipe),
        ("--force", flag), ("--json", flag),
    ),
    "tokenizer": _opts(
        ("--no-add-bos", flag), ("--chat", flag), ("--force", flag), ("--allow-ties", flag), ("--json", flag),
    ),
    "verify": _opts(
        ("--device", _value(["cpu", "auto"])), ("--dtype", _value(["fp32", "bf16"])),
        ("--rotary", _value(["hf", "adept"])), ("--prompt", junk), ("--prompts-file", path_recipe),
        ("--ids", _value(["1,2,3", "71013,1"])), ("--no-default-prompts", flag),
        ("--loader", _value(["auto", "persimmon-tools"])), ("--no-check-weights", flag),
        ("--iteration", _value(["1251"])), ("--vocab", path_recipe), ("--no-source-hash", flag),
        ("--json", flag), ("--json-file", out_recipe),
    ),
    "push": _opts(
        ("--revision", junk), ("--endpoint", junk), ("--card", _value(["keep", "replace"])),
        ("--max-retries", junk), ("--license", _value(["apache-2.0", "cc-by-nc-4.0"])),
        ("--allow-unverified", flag), ("--json", flag),
        ("--commit-message", junk),
    ),
}  # fmt: skip

POSITIONALS = {
    "convert": st.tuples(path_recipe, out_recipe, mostly_true, mostly_true),  # + --no-verify, + --dry-run
    "inspect": st.tuples(path_recipe),
    "unpack": st.tuples(path_recipe, out_recipe),
    "make-release": st.tuples(out_recipe),
    "tokenizer": st.tuples(path_recipe, st.booleans(), st.lists(out_recipe, max_size=2)),
    "verify": st.tuples(own_folder, path_recipe),
    "push": st.tuples(path_recipe, _value(["me/model", "org/persimmon-8b-chat"])),
}


def argv_strategy(command: str) -> st.SearchStrategy:
    """A drawn invocation: (command, positional recipes, option recipes, junk argv tail)."""
    tail = st.lists(st.one_of(junk, st.sampled_from(["--bogus", "-x", "--dtype", "--tp"])), max_size=2)
    if command == "tokenizer":  # extra positionals are OUT_DIR/corpus paths there: only option-like junk
        tail = st.lists(st.sampled_from(["--bogus", "-x", "--dtype", "--tp"]), max_size=2)
    tail = st.one_of(st.just([]), st.just([]), st.just([]), tail)
    return st.tuples(st.just(command), POSITIONALS[command], OPTIONS[command], tail)


def build_argv(drawn: tuple, ws: Workspace) -> list[str]:
    command, pos, opts, tail = drawn
    argv = [command]
    if command == "convert":
        src, out, no_verify, dry = pos
        argv += [materialize(src, ws), materialize(out, ws)]
        argv += ["--no-verify"] * no_verify + ["--dry-run"] * dry
    elif command == "tokenizer":
        sp, check, paths = pos
        argv += ["--check"] * check + [materialize(sp, ws)] + [materialize(p, ws) for p in paths]
    elif command == "verify":
        argv += [materialize(pos[0], ws), "--reference", materialize(pos[1], ws)]
    elif command == "push":
        argv += [materialize(pos[0], ws), pos[1], "--dry-run"]
    else:
        argv += [materialize(r, ws) for r in pos]
    for name, value in opts:
        argv.append(name)
        if value is not None:
            argv.append(materialize(value, ws) if isinstance(value, tuple) else value)
    return argv + list(tail)


# ---- running one example -------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st_ = p.lstat()
                out[str(p)] = (st_.st_size if p.is_file() else -1, st_.st_mtime_ns)
    return out


@dataclass
class Outcome:
    argv: list[str]
    exit_code: int
    problem: str | None  # why the example is not clean (None: clean)
    signature: tuple[str, str, str] | None = None  # where an unexpected exception came from


def signature(exc: BaseException) -> tuple[str, str, str]:
    """(file, function, exception type) of the innermost frame inside persimmon_tools."""
    where = ("?", "?")
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if "/persimmon_tools/" in path:
            where = (path.rsplit("/persimmon_tools/", 1)[1], frame.name)
    return (*where, type(exc).__name__)


def run_example(drawn: tuple, inputs: Path, sentinel: Path, example: Path) -> Outcome:
    """Run one drawn invocation in ``example`` (created fresh, removed after) and judge the outcome."""
    shutil.rmtree(example, ignore_errors=True)
    example.mkdir(parents=True)
    ws = Workspace(inputs, example)
    argv = build_argv(drawn, ws)
    before = snapshot(inputs, sentinel)
    old_cwd = os.getcwd()
    os.chdir(sentinel)  # a write to a relative path would land here and be caught
    try:
        result = CliRunner().invoke(main, argv, catch_exceptions=True)
    finally:
        os.chdir(old_cwd)
    problem, sig = None, None
    text = result.stdout + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        problem, sig = f"raised {type(exc).__name__}: {exc}\n{tb}", signature(exc)
    elif "Traceback" in text:
        problem = f"traceback in the output:\n{text}"
    elif result.exit_code not in OK_EXIT_CODES:
        problem = f"exit code {result.exit_code}:\n{text}"
    elif result.exit_code != 0 and "Error: " not in result.stderr and "Usage:" not in result.stderr:
        problem = f"exit code {result.exit_code} without an Error: line:\n{text}"
    else:
        after = snapshot(inputs, sentinel)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            problem = f"wrote outside its folder: {changed[:5]}"
    shutil.rmtree(example, ignore_errors=True)
    return Outcome(argv, result.exit_code, problem, sig)


def make_inputs(root: Path, release_tar: Path, converted: Path) -> tuple[Path, Path]:
    """The shared valid inputs and an empty sentinel folder, under ``root``."""
    from persimmon_tools.synth.build import bundled_vocab

    inputs, sentinel = root / "inputs", root / "sentinel"
    inputs.mkdir(parents=True)
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("nothing may change here")
    shutil.copy(release_tar, inputs / "release.tar")
    shutil.copytree(converted, inputs / "converted")
    (inputs / "vocab.model").write_bytes(bundled_vocab())
    (inputs / "corpus.txt").write_text("hello world\nsecond line\n")
    (inputs / "prompts.json").write_text('["human: Hi\\n\\nadept:", "The capital of France is"]')
    (inputs / "prompts.txt").write_text("one prompt\nanother\\nwith an escape\n")
    return inputs, sentinel


def set_offline_env(home: Path) -> dict[str, str | None]:
    """No network, no token, Hub caches inside the workspace; returns the old values."""
    new = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None}
    old = {k: os.environ.get(k) for k in new}
    for k, v in new.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


# ---- the CI test ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_root(releases, converted_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fuzz")
    inputs, sentinel = make_inputs(root, releases["tar"], converted_tiny)
    return root, inputs, sentinel


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_fails_cleanly_on_malformed_input(command, fuzz_root, monkeypatch):
    """Case fuzz-cli."""
    root, inputs, sentinel = fuzz_root
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    @CI
    @given(drawn=argv_strategy(command))
    def check(drawn):
        outcome = run_example(drawn, inputs, sentinel, root / "example")
        assert outcome.problem is None, f"{outcome.argv}: {outcome.problem}"

    check()
