"""verify's own interpretation of the source, and its agreement check against the converter's.

- verify's interpretation (own grid, stage roles, renumbering and TP merge over the one byte layer) gives
  exactly what synth wrote, for every SOURCE kind and TP/PP layout;
- a converter interpretation broken in ``persimmon_tools.megatron.checkpoint`` (stages swapped, a key
  dropped, wrong byte ranges copied, TP parts joined in the wrong order), broken for ``convert`` *and*
  ``verify`` alike, makes the flow fail with exit 3 and a "reader" finding that names the key and both
  interpretations, while the same flow passes unbroken; the agreement check compares byte ranges (no
  weights read) and falls back to the bytes for strided views;
- the byte layer on verify's path refuses foreign globals without calling them, and big-endian records (as
  for convert); inconsistent shards are refused by verify's own checks.
(The byte layer itself is proved against torch.load and tarfile in tests/megatron/test_byte_layer_oracle.py.)
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hostile_inputs import (
    fixture_members,
    model_with,
    patch_central_directory,
    storage,
    tar_with,
    write_torch_zip,
)
from hostile_inputs import tensor as tensor_ops
from reliability_cases import assert_clean_failure

from persimmon_tools.cli import main
from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE
from persimmon_tools.errors import CheckpointError, ReleaseError, UnsafeCheckpointError, VerificationError
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.ptwriter import TensorSpec
from persimmon_tools.megatron.release import open_release
from persimmon_tools.synth.build import build_release, logical_tensors, write_release_folder
from persimmon_tools.verification.agreement import CONVERTER, OWN, compare_bytes, compare_readers
from persimmon_tools.verification.source_merge import load_source

LAYOUTS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2), "2x3": (2, 3)}
TAR_FIXTURE = {"1x1": "tar", "2x1": "tp2", "1x2": "pp2", "2x3": "tp2pp3"}  # tests/conftest.py `releases`
ITER = "iter_0001251"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return logical_tensors(seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reader-folders")
    return {
        name: write_release_folder(build_release(tp=tp, pp=pp, seed=0), base / f"{name}_release")
        for name, (tp, pp) in LAYOUTS.items()
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _sources(kind: str, layout: str, releases, folders) -> Path:
    if kind == "tar":
        return releases[TAR_FIXTURE[layout]]
    if kind == "folder":
        return folders[layout]
    if kind == "iteration":
        return folders[layout] / ITER
    return folders[layout] / ITER / "mp_rank_00" / "model_optim_rng.pt"


CASES = [(k, lay) for k in ("tar", "folder", "iteration") for lay in LAYOUTS] + [("pt", "1x1")]


@pytest.mark.parametrize(("kind", "layout"), CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_reader_gives_exactly_what_synth_wrote(kind, layout, releases, folders, expected):
    ckpt = load_source(_sources(kind, layout, releases, folders))
    tp, pp = LAYOUTS[layout]
    assert (ckpt.release.kind, ckpt.release.tp, ckpt.release.pp) == (kind, tp, pp)
    assert ckpt.iteration == 1251
    assert ckpt.args.tensor_model_parallel_size == tp and ckpt.args.pipeline_model_parallel_size == pp
    assert ckpt.args.num_layers == 6 and ckpt.args.model_backend.value == "megatron"
    assert set(ckpt.tensors) == set(expected)
    for key, want in expected.items():
        got = ckpt.tensors[key]
        assert (got.shape, got.dtype) == (tuple(want.shape), want.dtype), key
        assert torch.equal(_bits(got.materialize()), _bits(want)), key
        blocks = list(got.iter_rows(max_bytes=100))  # small blocks: several per tensor, across TP parts
        assert torch.equal(_bits(torch.cat([b.reshape(-1) for b in blocks])), _bits(want)), key
    embed = ckpt.tensors["language_model.embedding.word_embeddings.weight"]
    ids = [0, 511, 512, 1023, 512, 7]  # both sides of the TP boundary, a repeat
    assert torch.equal(_bits(embed.rows(ids)), _bits(expected[embed.key][ids]))


def test_both_interpretations_agree_on_every_layout_without_reading_weights(releases, folders, monkeypatch):
    import persimmon_tools.megatron.lazy as ml

    sources = [*(releases[n] for n in TAR_FIXTURE.values()), folders["2x3"] / ITER]
    loaded = [(load_release_checkpoint(open_release(s)), load_source(s)) for s in sources]
    reads = []
    real = ml.pread_exact
    monkeypatch.setattr(ml, "pread_exact", lambda *a: reads.append(a[2]) or real(*a))
    for source, (theirs, ours) in zip(sources, loaded, strict=True):
        got = compare_readers(theirs, ours)
        assert got.agree and got.tensors_compared == 106 and not got.findings, (source, got.findings)
        assert got.bytes_compared == 0  # byte ranges compared; no tensor byte read
    assert reads == []
    # the plans do say where the bytes are: every tensor's ranges cover exactly its bytes
    for _, ours in loaded:
        for t in ours.tensors.values():
            (join, ranges), *_ = t.read_plans()
            assert sum(n for _, _, n in ranges) == t.nbytes and join == (
                "dim 1" if t.dim == 1 else "concatenated"
            )


def test_strided_tensors_are_compared_by_their_bytes(tmp_path):
    """A strided view has no byte ranges: its bytes are compared instead, and a misread is still caught."""
    base = torch.randn(5, 6)
    w = base[:4].t()  # shape [6, 4], stride [1, 6]: torch.save keeps the view
    assert not w.is_contiguous()
    pt = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"language_model": {"encoder": {"w": w}}}, "iteration": 7}, pt)
    theirs, ours = load_release_checkpoint(open_release(pt)), load_source(pt)
    got = compare_readers(theirs, ours)
    assert got.agree and (got.tensors_compared, got.bytes_compared) == (1, w.numel() * 4)
    key = "language_model.encoder.w"
    part = ours.tensors[key].parts[0]
    shifted = dataclasses.replace(part, offset=part.offset + 1)  # one element off: other values
    ours.tensors[key] = dataclasses.replace(ours.tensors[key], parts=(shifted,))
    got = compare_readers(theirs, ours)
    assert not got.agree and "elements differ" in got.findings[0].message and got.findings[0].where == key


def test_compare_bytes_names_the_first_differing_element_across_unaligned_blocks():
    class Rows:  # a reader giving row blocks of its own size
        def __init__(self, t, rows):
            self.t, self.rows, self.shape, self.dtype = t, rows, tuple(t.shape), t.dtype

        def iter_rows(self, max_bytes):
            for s in range(0, self.shape[0], self.rows):
                yield self.t[s : s + self.rows]

    a = torch.arange(60, dtype=torch.float32).reshape(12, 5)
    b = a.clone()
    assert compare_bytes("k", Rows(a, 5), Rows(b, 3), block_bytes=28) == (None, a.numel() * 4)
    b[7, 2] = -1.0
    b[9, 0] = float("nan")
    found, _ = compare_bytes("k", Rows(a, 5), Rows(b, 2), block_bytes=28)
    assert found.kind == "reader" and found.where == "k"
    assert f"{CONVERTER} gives 37.0 at [7, 2], {OWN} gives -1.0 (2 of 60 elements differ" in found.message


# ---------------------------------------------------------------- a broken converter reader


def _swap_stage_order(monkeypatch):
    """Layer offsets applied in the wrong stage order: the last stage's layers become layers 0.., etc."""
    import persimmon_tools.megatron.checkpoint as mc

    real = mc.Checkpoint

    def checkpoint(**kw):
        pp, tensors = kw["release"].pp, kw["tensors"]
        layers = 1 + max(
            int(k.split(".")[3]) for k in tensors if k.startswith("language_model.encoder.layers.")
        )
        per = layers // pp

        def moved(key: str) -> str:
            bits = key.split(".")
            if key.startswith("language_model.encoder.layers."):
                bits[3] = str((int(bits[3]) + per) % layers)
            return ".".join(bits)

        kw["tensors"] = {moved(k): dataclasses.replace(v, key=moved(k)) for k, v in tensors.items()}
        return real(**kw)

    monkeypatch.setattr(mc, "Checkpoint", checkpoint)


DROPPED = "language_model.encoder.layers.3.self_attention.rotary_emb.inv_freq"


def _drop_a_key(monkeypatch):
    import persimmon_tools.megatron.checkpoint as mc

    real = mc.Checkpoint

    def checkpoint(**kw):
        kw["tensors"] = {k: v for k, v in kw["tensors"].items() if k != DROPPED}
        return real(**kw)

    monkeypatch.setattr(mc, "Checkpoint", checkpoint)


def _copy_ranges_one_element_early(monkeypatch):
    """The converter's merged tensors name byte ranges one element early (a wrong offset) for every matrix,
    so its writer copies the wrong bytes. (Vectors stay right: a shifted inv_freq is caught by convert's own
    args/inv_freq cross-check before verify runs.)"""
    import persimmon_tools.megatron.checkpoint as mc

    real = mc.MergedTensor.byte_ranges

    def byte_ranges(self):
        ranges = real(self)
        if ranges is None or len(self.shape) < 2:
            return ranges
        return [(path, offset - self.dtype.itemsize, n) for path, offset, n in ranges]

    monkeypatch.setattr(mc.MergedTensor, "byte_ranges", byte_ranges)


def _swap_tp_parts(monkeypatch):
    """TP parts joined in the wrong rank order (rank 1's rows or columns first)."""
    import persimmon_tools.megatron.checkpoint as mc

    real = mc.Checkpoint

    def checkpoint(**kw):
        kw["tensors"] = {k: dataclasses.replace(v, parts=v.parts[::-1]) for k, v in kw["tensors"].items()}
        return real(**kw)

    monkeypatch.setattr(mc, "Checkpoint", checkpoint)


BROKEN = {
    "stages_swapped": ("pp2", _swap_stage_order, "language_model.encoder.layers.0.", " reads bytes "),
    "key_dropped": ("tar", _drop_a_key, DROPPED, f"{CONVERTER} has no such tensor, {OWN} gives shape [4]"),
    "bytes_misread": ("tp2", _copy_ranges_one_element_early, "language_model.", " reads bytes "),
    "tp_parts_swapped": ("tp2", _swap_tp_parts, "self_attention.dense.weight", "joined on dim 1"),
}


def _convert(source: Path, out: Path):
    return CliRunner().invoke(main, ["convert", str(source), str(out)])


def test_convert_and_verify_pass_with_the_reader_intact(releases, tmp_path):
    result = _convert(releases["pp2"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / VERIFICATION_FILE).read_text())
    assert report["verdict"] == "pass"
    assert report["readers"]["agree"] is True and report["readers"]["tensors_compared"] == 106
    assert report["readers"]["differences"] == [] and report["timings"]["readers_s"] >= 0


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_converter_reader_fails_convert_and_verify(case, releases, tmp_path, monkeypatch):
    """Case converter-reader-broken: the converter's interpretation broken on purpose fails verify."""
    source, breaks, key_part, words = BROKEN[case]
    breaks(monkeypatch)  # active for convert AND for the verify convert runs at its end
    result = _convert(releases[source], tmp_path / "out")
    assert_clean_failure(result, exit_code=3)
    assert "reader of the source disagree" in result.stderr
    report = json.loads((tmp_path / "out" / VERIFICATION_FILE).read_text())
    assert report["verdict"] == "fail" and report["readers"]["agree"] is False
    assert report["metrics"] == []  # no forward pass on inconsistent inputs
    diffs = report["readers"]["differences"]
    hit = [d for d in diffs if d["kind"] == "reader" and key_part in d["where"] and words in d["message"]]
    assert hit, diffs
    assert CONVERTER in hit[0]["message"] and OWN in hit[0]["message"]
    assert report["diagnosis"]["most_likely"]["kind"] == "reader"


# ---------------------------------------------------------------- the pickle and the byte order


def _zip_pt(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


_RAN: list[str] = []


def _side_effect(tag: str) -> str:  # what an unsafe unpickler would call
    _RAN.append(tag)
    return tag


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("executed",))


@pytest.mark.parametrize(
    ("pkl", "qual"),
    [
        (b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.", "os.system"),
        (b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.", "builtins.eval"),
        (pickle.dumps({"model": {}, "x": _Evil()}, protocol=2), "_side_effect"),
    ],
    ids=["os.system", "eval", "module-function"],
)
def test_unsafe_global_is_refused_without_running_it(tmp_path, pkl, qual):
    _RAN.clear()
    pt = _zip_pt(tmp_path / "model_optim_rng.pt", {"archive/data.pkl": pkl, "archive/byteorder": b"little"})
    with pytest.raises(UnsafeCheckpointError, match="not on the allowlist; nothing was executed") as err:
        load_source(pt)  # verify's path: the same byte layer as convert's, the same refusal
    assert qual in str(err.value) and str(pt) in str(err.value) and err.value.hint
    assert _RAN == []
    # the same pickle through a plain unpickler does run it: the test would notice a permissive reader
    if qual == "_side_effect":
        pickle.loads(pkl)
        assert _RAN == ["executed"]


def _hostile_source(tmp_path: Path, releases, kind: str) -> Path:
    """Inputs the two byte readers used to treat differently (verify's skipped or accepted them)."""
    if kind in ("dotdot", "absolute"):
        bad = tarfile.TarInfo("tiny_release/../../escape.txt" if kind == "dotdot" else "/tmp/abs.txt")
        return tar_with(tmp_path / "r.tar", [*fixture_members(releases["tar"]), (bad, b"evil")])
    if kind == "after-the-end":  # tarfile stops listing there without a word
        tar = tmp_path / "r.tar"
        tar.write_bytes(releases["tar"].read_bytes() + b"appended data")
        return tar
    pt = write_torch_zip(
        tmp_path / "model_optim_rng.pt", model_with(tensor_ops(storage())), {"0": bytes(16), "1": bytes(16)}
    )
    with zipfile.ZipFile(pt) as zf:
        first = zf.getinfo("archive/data/0").header_offset
    patch_central_directory(pt, "archive/data/1", header_offset=first)  # two records over the same bytes
    return pt


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dotdot", "points outside the archive"),
        ("absolute", "points outside the archive"),
        ("after-the-end", "follows a zero block"),
        ("overlapping-records", "overlap"),
    ],
)
def test_verify_refuses_what_convert_refuses(tmp_path, releases, kind, message):
    """One byte layer: verify's path refuses these exactly as convert's does (it used to skip ``..`` and
    absolute members without a word, and had no end-of-archive or overlapping-record checks)."""
    source = _hostile_source(tmp_path, releases, kind)
    errors = []
    for read in (lambda: load_release_checkpoint(open_release(source)), lambda: load_source(source)):
        with pytest.raises((ReleaseError, CheckpointError), match=message) as err:
            read()
        errors.append((type(err.value), err.value.message))
    assert errors[0] == errors[1] and err.value.hint


def _byteswapped(pt_bytes: bytes, unit: int) -> bytes:
    """The same torch.save file as a big-endian machine writes it: byteorder 'big', records swapped."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(pt_bytes)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = (
                    torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    .view(-1, unit)
                    .flip(1)
                    .numpy()
                    .tobytes()
                )
            zout.writestr(info.filename, data)
    return out.getvalue()


@pytest.mark.parametrize(
    ("dtype", "unit"), [(torch.bfloat16, 2), (torch.float32, 4), (torch.int64, 8), (torch.complex64, 4)]
)
def test_big_endian_records_are_refused_on_verifys_path_too(tmp_path, dtype, unit):
    """One byte layer, one behaviour: verify refuses a big-endian checkpoint as convert does
    (tests/megatron/test_byteorder.py), rather than reading it differently."""
    w = (torch.randn(6, 5, dtype=torch.float64) * 3).to(dtype)
    b = torch.arange(6).to(dtype)
    buf = io.BytesIO()
    torch.save({"model": {"language_model": {"encoder": {"w": w, "b": b}}}, "iteration": 7}, buf)
    big = tmp_path / "model_optim_rng.pt"
    big.write_bytes(_byteswapped(buf.getvalue(), unit))
    # a genuine big-endian file: torch byteswaps it back, and its raw bytes are not w's
    assert torch.equal(torch.load(big, weights_only=True)["model"]["language_model"]["encoder"]["w"], w)
    assert not torch.equal(_bits(w), _bits(_raw_record(big.read_bytes(), w)))
    with pytest.raises(CheckpointError, match="says the tensors are stored big-endian") as err:
        load_source(big)
    assert "torch.save" in err.value.hint
    little = tmp_path / "little" / "model_optim_rng.pt"  # control: the same file as written reads
    little.parent.mkdir()
    little.write_bytes(buf.getvalue())
    got = load_source(little).tensors["language_model.encoder.w"]
    assert torch.equal(_bits(got.materialize()), _bits(w))


def _raw_record(pt_bytes: bytes, like: torch.Tensor) -> torch.Tensor:
    with zipfile.ZipFile(io.BytesIO(pt_bytes)) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            if "/data/" in name and len(data) == like.numel() * like.element_size():
                return torch.frombuffer(bytearray(data), dtype=like.dtype)
    raise AssertionError("record not found")


# ---------------------------------------------------------------- inconsistent input the reader refuses


def _renumber_stage(rel):
    enc = rel.objects[(0, 1)]["model"]["language_model"]["encoder"]
    for key in [k for k in enc if k.startswith("layers.0.")]:
        enc[key.replace("layers.0.", "layers.5.", 1)] = enc.pop(key)


def _other_iteration(rel):
    rel.objects[(0, 1)]["iteration"] = 99


def _head_on_the_first_stage(rel):
    first, last = rel.objects[(0, 0)]["model"], rel.objects[(0, 1)]["model"]
    first["word_embeddings_for_head"] = last.pop("word_embeddings_for_head")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_renumber_stage, "pipeline stage 1 holds layers [1, 2, 5], not 0..2"),
        (_other_iteration, "the shards record different iterations"),
        (
            _head_on_the_first_stage,
            "pipeline stage 0 of 2 holds word_embeddings_for_head.weight, which only the last stage holds",
        ),
    ],
)
def test_inconsistent_pipeline_shards_are_refused(tmp_path, edit, message):
    rel = build_release(pp=2, seed=0)
    edit(rel)
    folder = write_release_folder(rel, tmp_path / "rel")
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_source(folder)
    assert err.value.hint


def test_verify_checks_the_shard_grid_itself(releases):
    release = open_release(releases["tp2pp3"])
    holed = dataclasses.replace(release, shards={r: s for r, s in release.shards.items() if r != (1, 1)})
    with pytest.raises(
        CheckpointError, match=re.escape("not a complete TP=2 x PP=3 grid (missing [(1, 1)])")
    ):
        load_source(holed)


def test_replicated_tensor_differing_between_tp_ranks_is_refused(tmp_path):
    rel = build_release(tp=2, seed=0)
    key = "language_model.encoder.layers.4.post_attention_layernorm.bias"
    encoder = rel.objects[(1, 0)]["model"]["language_model"]["encoder"]
    spec = encoder[key.removeprefix("language_model.encoder.")]
    copy = torch.cat(list(spec.blocks())).clone()
    copy.view(torch.uint8)[3] ^= 0x01  # one bit of rank 1's copy, written with a consistent CRC-32
    encoder[key.removeprefix("language_model.encoder.")] = TensorSpec.of(copy)
    folder = write_release_folder(rel, tmp_path / "rel")
    with pytest.raises(CheckpointError, match=re.escape(f"{key} is replicated across tensor-parallel ranks")):
        load_source(folder)


def test_disagreeing_readers_with_an_incomplete_own_view_is_a_verification_error(
    converted_tiny, releases, monkeypatch
):
    import persimmon_tools.verification.verify as vv

    real = vv.load_source

    def without_embedding(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        del ckpt.tensors["language_model.embedding.word_embeddings.weight"]
        return ckpt

    monkeypatch.setattr(vv, "load_source", without_embedding)
    with pytest.raises(VerificationError, match="not a complete Persimmon checkpoint") as err:
        vv.verify(converted_tiny, releases["tar"], vv.VerifyOptions(write=False, loader="persimmon-tools"))
    assert f"{OWN} has no such tensor" in str(err.value) and err.value.exit_code == 3
