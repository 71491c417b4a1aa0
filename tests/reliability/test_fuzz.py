"""Fuzzing: random byte mutations of the tiny fixture's tar and of a release folder's ``model_optim_rng.pt``.

Every outcome must be a complete conversion or a :class:`PersimmonToolsError`, within a bounded time, and
nothing may be written outside the example's output folder. Mutations are flips, overwrites, inserts,
deletes and truncations; half of them land in the structural bytes (tar headers, the pickle, the zip
directory), where a random position rarely goes, the rest anywhere.

Runs are derandomized (the same examples in every CI run). ``PERSIMMON_FUZZ_RANDOM=1`` draws new examples
and ``PERSIMMON_FUZZ_EXAMPLES=N`` runs more of them, e.g. for a long local session.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.synth.build import build_release, write_release_folder

EXAMPLES = int(os.environ.get("PERSIMMON_FUZZ_EXAMPLES", "60"))
MAX_SECONDS = 30.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=MAX_SECONDS),
    derandomize=os.environ.get("PERSIMMON_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PT = "iter_0001251/mp_rank_00/model_optim_rng.pt"


@dataclass(frozen=True, repr=False)
class Target:
    data: bytes
    regions: list[tuple[int, int]]  # structural byte ranges (tar headers, pickle, zip directory)

    def __repr__(self) -> str:  # hypothesis prints the arguments of failing examples
        return f"Target({len(self.data)} bytes, {len(self.regions)} structural regions)"


def _pt_regions(pt: bytes, base: int = 0) -> list[tuple[int, int]]:
    with zipfile.ZipFile(io.BytesIO(pt)) as zf:
        pkl = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        start_dir = zf.start_dir
    return [
        (base + pkl.header_offset, base + pkl.header_offset + 100 + pkl.file_size),
        (base + start_dir, base + len(pt)),
    ]


@pytest.fixture(scope="module")
def tar_target(releases) -> Target:
    data = releases["tar"].read_bytes()
    regions = []
    with tarfile.open(releases["tar"]) as tf:
        for m in tf.getmembers():
            regions.append((m.offset, m.offset_data))
            if m.name.endswith(".pt"):
                regions += _pt_regions(data[m.offset_data : m.offset_data + m.size], m.offset_data)
    return Target(data, regions)


@pytest.fixture(scope="module")
def pt_folder(tmp_path_factory) -> Path:
    return write_release_folder(build_release(seed=0), tmp_path_factory.mktemp("fuzz") / "rel")


@pytest.fixture(scope="module")
def pt_target(pt_folder) -> Target:
    data = (pt_folder / PT).read_bytes()
    return Target(data, _pt_regions(data))


@pytest.fixture(scope="module")
def work_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]),
        st.booleans(),  # True: inside a structural region
        st.integers(min_value=0, max_value=2**32),  # region choice / position
        st.integers(min_value=0, max_value=2**32),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=4,
)


def mutate(target: Target, ops) -> bytes:
    data = bytearray(target.data)
    for kind, structural, a, b, payload in ops:
        if not data:
            break
        if structural:
            lo, hi = target.regions[a % len(target.regions)]
            hi = min(hi, len(data))
            pos = lo + b % max(1, hi - lo) if lo < hi else b % len(data)
        else:
            pos = (a * 2**32 + b) % len(data)
        if kind == "flip":
            data[pos] ^= 1 << (b % 8)
        elif kind == "overwrite":
            data[pos : pos + len(payload)] = payload
        elif kind == "insert":
            data[pos:pos] = payload
        elif kind == "delete":
            del data[pos : pos + len(payload)]
        else:
            del data[pos:]
    return bytes(data)


def run_example(work_base: Path, make_source) -> None:
    """Convert the source ``make_source(src_dir)`` builds; check the outcome and where files went."""
    work = Path(tempfile.mkdtemp(dir=work_base))
    src, dst, cwd = work / "src", work / "dst", work / "cwd"
    for d in (src, dst, cwd):
        d.mkdir()
    source = make_source(src)
    src_files = sorted(p.relative_to(src) for p in src.rglob("*"))
    old_cwd = os.getcwd()
    os.chdir(cwd)
    start = time.monotonic()
    try:
        result = convert(source, dst / "out", ConvertOptions())
    except PersimmonToolsError as err:
        event(type(err).__name__)
        assert os.listdir(dst) == [], "a failed conversion left files behind"
    else:
        event("converted")
        files = set(os.listdir(dst / "out"))
        assert set(result.files) == files and {"config.json", "model.safetensors", "tokenizer.json"} <= files
        assert json.loads((dst / "out" / "config.json").read_text())["model_type"] == "persimmon"
        assert os.listdir(dst) == ["out"]
    finally:
        os.chdir(old_cwd)
    assert time.monotonic() - start < MAX_SECONDS
    assert os.listdir(cwd) == [] and sorted(p.relative_to(src) for p in src.rglob("*")) == src_files
    shutil.rmtree(work)


@FUZZ
@given(ops=mutations)
def test_mutated_tar(tar_target, work_base, ops):
    """Case fuzz-tar."""

    def make(src: Path) -> Path:
        path = src / "tiny_release.tar"
        path.write_bytes(mutate(tar_target, ops))
        return path

    run_example(work_base, make)


@FUZZ
@given(ops=mutations)
def test_mutated_pt(pt_folder, pt_target, work_base, ops):
    """Case fuzz-pt."""

    def make(src: Path) -> Path:
        folder = shutil.copytree(pt_folder, src / "rel")
        (folder / PT).write_bytes(mutate(pt_target, ops))
        return folder

    run_example(work_base, make)
