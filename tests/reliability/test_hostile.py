"""Hostile inputs: tar members, pickles, zip records and storages built to escape, execute or read elsewhere.

Each is refused with a typed error (checked through the library and the CLI: ``Error:``, exit 1, no
traceback), and sentinel files prove that nothing ran and nothing was written outside the output folder.
Cases and expected messages come from ``reliability_cases.py`` (rendered into docs/reliability.md).
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hostile_inputs import (
    P,
    Reduce,
    basic_hostile_tar,
    call,
    checkpoint_with_args,
    fixture_members,
    glob,
    model_with,
    patch_central_directory,
    program,
    s,
    storage,
    tar_with,
    tensor,
    write_pt_obj,
    write_torch_zip,
)
from reliability_cases import assert_clean_failure, expect, expect_cli

from persimmon_tools.cli import main
from persimmon_tools.conversion.config import derive_dims
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.megatron.release import open_release
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.synth.build import build_release, write_release_folder


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- tar members (convert reads tarballs in place) -----------------------------------------------------


def _hostile_release_tar(tmp_path: Path, fixture: Path, kind: str, outside: Path) -> Path:
    members = fixture_members(fixture)
    pt_index = next(i for i, (m, _) in enumerate(members) if m.name.endswith("model_optim_rng.pt"))
    pt_info, pt_data = members[pt_index]
    link = copy.copy(pt_info)
    if kind == "tar-dotdot":
        extra = tarfile.TarInfo("tiny_release/../../escape.txt")
        members.append((extra, b"escape"))
    elif kind == "tar-absolute":
        members.append((tarfile.TarInfo(str(outside / "abs.txt")), b"absolute"))
    elif kind == "tar-symlink-shard":
        (outside / "real.pt").write_bytes(pt_data)  # a valid checkpoint: following the link would "work"
        link.type, link.linkname, link.size = tarfile.SYMTYPE, str(outside / "real.pt"), 0
        members[pt_index] = (link, None)
    elif kind == "tar-hardlink-shard":
        link.type, link.linkname, link.size = tarfile.LNKTYPE, "/etc/passwd", 0
        members[pt_index] = (link, None)
    elif kind == "tar-device-shard":
        link.type, link.devmajor, link.devminor, link.size = tarfile.CHRTYPE, 1, 3, 0
        members[pt_index] = (link, None)
    elif kind == "tar-fifo-vocab":
        vocab = next(i for i, (m, _) in enumerate(members) if m.name.endswith("adept_vocab.model"))
        fifo = copy.copy(members[vocab][0])
        fifo.type, fifo.size = tarfile.FIFOTYPE, 0
        members[vocab] = (fifo, None)
    elif kind == "tar-duplicate-shard":
        members.append((copy.copy(pt_info), pt_data))
    return tar_with(tmp_path / "src" / "hostile_release.tar", members)


@pytest.mark.parametrize(
    "kind",
    [
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink-shard",
        "tar-hardlink-shard",
        "tar-device-shard",
        "tar-fifo-vocab",
        "tar-duplicate-shard",
    ],
)
def test_convert_refuses_hostile_tar_members(releases, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "src").mkdir()
    tar = _hostile_release_tar(tmp_path, releases["tar"], kind, outside)
    before = tree(outside)
    with pytest.raises(PersimmonToolsError) as err:
        open_release(tar)
    expect(kind, err.value)
    work = tmp_path / "work"
    work.mkdir()
    expect_cli(kind, cli("convert", tar, work / "out"))
    assert tree(work) == [] and tree(outside) == before
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_stray_link_in_a_tar_is_ignored_and_nothing_is_extracted(releases, tmp_path):
    """Case tar-stray-symlink: links that are not release files are skipped, never followed."""
    members = fixture_members(releases["tar"])
    link = tarfile.TarInfo("tiny_release/README")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    tar = tar_with(tmp_path / "release.tar", [*members, (link, None)])
    out = tmp_path / "out"
    convert(tar, out, ConvertOptions())
    assert not any(p.is_symlink() for p in out.rglob("*")) and "README" not in tree(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "release.tar"]


def _unpack_case(path: Path, kind: str, outside: Path) -> None:
    def reg(name: str, data: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
        return tarfile.TarInfo(name), data

    if kind == "unpack-fifo":
        fifo = tarfile.TarInfo("rel/fifo")
        fifo.type = tarfile.FIFOTYPE
        tar_with(path, [reg("rel/ok.txt"), (fifo, None)])
    elif kind == "unpack-link-then-file":
        link = tarfile.TarInfo("rel/out")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar_with(path, [(link, None), reg("rel/out/pwned.txt")])
    elif kind == "unpack-nested-dotdot":
        tar_with(path, [reg("./rel/ok.txt"), reg("./rel/./../../pwned.txt")])
    elif kind == "unpack-gzip-dotdot":
        with tarfile.open(path, "w:gz") as tf:
            info = tarfile.TarInfo("../pwned.txt")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    elif kind == "unpack-duplicate":
        tar_with(path, [reg("rel/a.txt", b"first"), reg("rel/a.txt", b"second")])


@pytest.mark.parametrize(
    "kind",
    [
        "unpack-fifo",
        "unpack-link-then-file",
        "unpack-nested-dotdot",
        "unpack-gzip-dotdot",
        "unpack-duplicate",
    ],
)
def test_unpack_refuses_more_hostile_members(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    tar = tmp_path / "evil.tar"
    _unpack_case(tar, kind, outside)
    expect_cli(kind, cli("unpack", tar, work / "dest"))
    assert tree(work) == [] and tree(outside) == []  # no DEST, no temp folder, nothing escaped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar", "outside", "work"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unpack_messages_of_basic_hostile_members(tmp_path, kind):
    """test_cli_core checks these refuse and write nothing; here: that the message says why."""

    case = {
        "dotdot": "unpack-dotdot",
        "absolute": "unpack-absolute",
        "symlink": "unpack-symlink",
        "hardlink": "unpack-hardlink",
        "device": "unpack-device",
    }[kind]
    (tmp_path / "outside").mkdir()
    basic_hostile_tar(tmp_path / "evil.tar", kind, tmp_path / "outside")
    expect_cli(case, cli("unpack", tmp_path / "evil.tar", tmp_path / "dest"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar", "outside"]


# ---- pickles ------------------------------------------------------------------------------------------


def _payloads(tmp_path: Path) -> dict[str, tuple[str, str, tuple, bool]]:
    """name -> (module, global, args, live): ``live`` payloads create ``pwned`` when really unpickled."""
    s_ = str(tmp_path / "pwned")
    nested = pickle.dumps(Reduce(os.system, f"touch {s_}"), protocol=2)
    buf = io.BytesIO()
    torch.save(Reduce(os.system, f"touch {s_}"), buf)
    evil_pt = tmp_path / "nested.pt"
    evil_pt.write_bytes(buf.getvalue())
    protected = tmp_path / "protected"
    protected.mkdir(exist_ok=True)
    (protected / "keep").write_text("x")
    return {
        "os.system": ("os", "system", (f"touch {s_}",), True),
        "posix.system": ("posix", "system", (f"touch {s_}",), True),
        "builtins.eval": ("builtins", "eval", (f"open({s_!r}, 'w')",), True),
        "builtins.exec": ("builtins", "exec", (f"open({s_!r}, 'w').close()",), True),
        "builtins.open": ("builtins", "open", (s_, "w"), True),
        "builtins.getattr": ("builtins", "getattr", ("x", "upper"), False),
        "builtins.__import__": ("builtins", "__import__", ("os",), False),
        "subprocess.Popen": ("subprocess", "Popen", (["touch", s_],), True),
        "subprocess.run": ("subprocess", "run", (["touch", s_],), True),
        "subprocess.check_output": ("subprocess", "check_output", (["touch", s_],), True),
        "shutil.rmtree": ("shutil", "rmtree", (str(protected),), False),
        "importlib.import_module": ("importlib", "import_module", ("json",), False),
        "pickle.loads": ("pickle", "loads", (nested,), True),
        "torch.load": ("torch", "load", (str(evil_pt),), False),
        "torch.hub.load": ("torch.hub", "load", ("owner/repo", "model"), False),
        "torch.jit.load": ("torch.jit", "load", (str(evil_pt),), False),
        "torch.storage._load_from_bytes": ("torch.storage", "_load_from_bytes", (buf.getvalue(),), True),
        "torch._utils._rebuild_device_tensor_from_numpy": (
            "torch._utils",
            "_rebuild_device_tensor_from_numpy",
            ("x", "float32", "cpu", False),
            False,
        ),
        "torch.serialization.load": ("torch.serialization", "load", (str(evil_pt),), False),
    }


_GLOBALS = [
    "os.system",
    "posix.system",
    "builtins.eval",
    "builtins.exec",
    "builtins.open",
    "builtins.getattr",
    "builtins.__import__",
    "subprocess.Popen",
    "subprocess.run",
    "subprocess.check_output",
    "shutil.rmtree",
    "importlib.import_module",
    "pickle.loads",
    "torch.load",
    "torch.hub.load",
    "torch.jit.load",
    "torch.storage._load_from_bytes",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch.serialization.load",
]


@pytest.mark.parametrize("name", _GLOBALS)
def test_disallowed_globals_are_refused_and_nothing_runs(tmp_path, name):
    payloads = _payloads(tmp_path)
    assert sorted(payloads) == sorted(_GLOBALS)
    module, attr, args, live = payloads[name]
    sentinel = tmp_path / "pwned"
    pkl = checkpoint_with_args(call(module, attr, *args))
    if live:  # control: the payload is real; a plain unpickler runs it
        made = pickle.loads(pkl)["args"]
        if isinstance(made, subprocess.Popen):
            made.wait()
        assert sentinel.exists()
        sentinel.unlink()
    path = write_torch_zip(tmp_path / "evil.pt", pkl)
    with pytest.raises(PersimmonToolsError) as err:
        load_checkpoint(ByteSource.whole_file(path))
    expect("pickle-globals", err.value)
    assert f"{module}.{attr}" in err.value.message
    result = cli("convert", path, tmp_path / "out")
    expect_cli("pickle-globals", result)
    assert not sentinel.exists() and not (tmp_path / "out").exists()
    assert (tmp_path / "protected" / "keep").exists()


def test_hostile_pickle_inside_a_release_tar(releases, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = write_torch_zip(
        tmp_path / "evil.pt", checkpoint_with_args(call("posix", "system", f"touch {sentinel}"))
    )
    members = [
        (m, evil.read_bytes() if m.name.endswith(".pt") else data)
        for m, data in fixture_members(releases["tar"])
    ]
    tar = tar_with(tmp_path / "8b_chat_model_release.tar", members)
    expect_cli("pickle-in-release", cli("convert", tar, tmp_path / "out"))
    expect_cli("pickle-in-release", cli("inspect", tar))
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_adept_and_megatron_classes_are_never_imported(tmp_path, monkeypatch):
    """Case pickle-adept-module: stand-ins only; the modules on sys.path are never imported."""
    mods, sentinel = tmp_path / "mods", tmp_path / "imported"
    fake: dict[str, types.ModuleType] = {}
    rel = build_release(seed=0)
    for pkg in ("tool_use", "megatron"):
        (mods / pkg).mkdir(parents=True)
        code = f"open({str(sentinel)!r}, 'a').write(__name__ + '\\n')\n"
        (mods / pkg / "__init__.py").write_text(code)
        (mods / pkg / "evil.py").write_text(code)
        module = types.ModuleType(f"{pkg}.evil")
        module.Payload = type("Payload", (), {"__module__": f"{pkg}.evil"})
        fake[f"{pkg}.evil"] = module
        setattr(rel.objects[(0, 0)]["args"], f"{pkg}_payload", module.Payload())
    with monkeypatch.context() as mp:  # importable only while the checkpoint is written
        for name, module in fake.items():
            mp.setitem(sys.modules, name, module)
        mp.setitem(sys.modules, "megatron", types.ModuleType("megatron"))
        folder = write_release_folder(rel, tmp_path / "rel")
    monkeypatch.syspath_prepend(str(mods))
    import importlib.util

    assert importlib.util.find_spec("megatron") is not None  # control: the modules would import
    result = convert(folder, tmp_path / "out", ConvertOptions())
    assert result.plan.checkpoint.globals_seen["tool_use.evil.Payload"] == "inert stand-in"
    assert result.plan.checkpoint.globals_seen["megatron.evil.Payload"] == "inert stand-in"
    assert not sentinel.exists()
    assert not {"tool_use.evil", "megatron.evil", "megatron"} & set(sys.modules)


@pytest.mark.parametrize("case", ["pickle-build-storage", "pickle-build-tensor"])
def test_build_cannot_rewrite_tensors_or_storages(tmp_path, case):
    if case == "pickle-build-storage":  # would make the tensor read /etc/passwd into the converted model
        rewrite = P.EMPTY_DICT + s("path") + s("/etc/passwd") + P.SETITEM + P.BUILD
        pkl = model_with(tensor(storage(), after_storage=rewrite))
    else:  # would bypass the view-inside-storage check
        grow = P.EMPTY_DICT + s("shape") + P.BININT + struct.pack("<i", 10**6) + P.TUPLE1 + P.SETITEM
        pkl = model_with(tensor(storage()) + grow + P.BUILD)
    path = write_torch_zip(tmp_path / "evil.pt", pkl)
    with pytest.raises(PersimmonToolsError) as err:
        load_checkpoint(ByteSource.whole_file(path))
    expect(case, err.value)
    expect_cli(case, cli("convert", path, tmp_path / "out"))


def _trick(case: str) -> bytes:
    if case == "pickle-rebuild-from-type":
        wrapped = glob("argparse", "Namespace") + glob("torch", "Tensor") + P.EMPTY_TUPLE + P.EMPTY_DICT
        args = glob("torch._tensor", "_rebuild_from_type_v2") + P.MARK + wrapped + P.TUPLE + P.REDUCE
    elif case == "pickle-reconstructor":
        cls = glob("builtins", "set")  # allowlisted itself: the refusal is of the reconstruction
        args = glob("copyreg", "_reconstructor") + P.MARK + cls + cls + P.NONE + P.TUPLE + P.REDUCE
    elif case == "pickle-codecs":
        args = call("_codecs", "encode", "payload", "rot13")
    elif case == "pickle-persid":
        args = s("not a storage") + P.BINPERSID
    elif case == "pickle-persid-type":
        args = (
            P.MARK
            + s("storage")
            + glob("argparse", "Namespace")
            + s("0")
            + s("cpu")
            + P.BININT1
            + b"\x04"
            + P.TUPLE
            + P.BINPERSID
        )
    else:  # pickle-parameter
        args = glob("torch.nn.parameter", "Parameter") + P.MARK + s("x") + P.TUPLE + P.REDUCE
    return checkpoint_with_args(args)


@pytest.mark.parametrize(
    "case",
    [
        "pickle-rebuild-from-type",
        "pickle-reconstructor",
        "pickle-codecs",
        "pickle-persid",
        "pickle-persid-type",
        "pickle-parameter",
    ],
)
def test_reduce_tricks_with_allowed_globals(tmp_path, case):
    path = write_torch_zip(tmp_path / "evil.pt", _trick(case))
    with pytest.raises(PersimmonToolsError) as err:
        load_checkpoint(ByteSource.whole_file(path))
    expect(case, err.value)
    expect_cli(case, cli("convert", path, tmp_path / "out"))


def _shared_subtree(levels: int) -> bytes:
    ops = [P.EMPTY_DICT, P.LONG_BINPUT + struct.pack("<I", 0), P.POP]
    for k in range(1, levels + 1):
        get = P.LONG_BINGET + struct.pack("<I", k - 1)
        ops += [P.EMPTY_DICT, P.MARK, s("a"), get, s("b"), get, P.SETITEMS]
        ops += [P.LONG_BINPUT + struct.pack("<I", k), P.POP]
    ops += [P.EMPTY_DICT, s("model"), P.LONG_BINGET + struct.pack("<I", levels), P.SETITEM]
    return program(*ops)


@pytest.mark.parametrize("case", ["pickle-self-reference", "pickle-shared-subtree", "pickle-duplicate-name"])
def test_model_dict_must_be_a_tree(tmp_path, case):
    path = tmp_path / "model_optim_rng.pt"
    if case == "pickle-self-reference":
        loop = [P.EMPTY_DICT, P.BINPUT + b"\x01", s("loop"), P.BINGET + b"\x01", P.SETITEM]
        write_torch_zip(path, program(P.EMPTY_DICT, s("model"), *loop, P.SETITEM))
    elif case == "pickle-shared-subtree":
        write_torch_zip(path, _shared_subtree(40))
    else:
        write_pt_obj(path, {"model": {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}})
    with pytest.raises(PersimmonToolsError) as err:
        load_release_checkpoint(open_release(path))
    expect(case, err.value)
    expect_cli(case, cli("convert", path, tmp_path / "out"))
    expect_cli(case, cli("inspect", path))


def _memo_index_bomb(background, folder: Path) -> subprocess.CompletedProcess:
    """A ``background`` job (tests/conftest.py): load a pickle whose memo index is 2**31 - 1 in a child that
    reports its error, time and memory growth as JSON."""
    path = write_torch_zip(
        folder / "model_optim_rng.pt", program(P.EMPTY_DICT, P.LONG_BINPUT + struct.pack("<I", 2**31 - 1))
    )
    code = f"""
import json, resource, time
from persimmon_tools.megatron.checkpoint import load_release_checkpoint
from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.megatron.release import open_release
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    load_release_checkpoint(open_release({str(path)!r}))
except PersimmonToolsError as err:
    error = [type(err).__name__, err.message]
print(json.dumps({{"error": error, "seconds": time.perf_counter() - start,
                  "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    return background.run([sys.executable, "-c", code], cwd=folder, env=background.environ, timeout=120)


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the memo-index bomb's child
    runs beside the tests."""
    if any(item.originalname == "test_memo_index_bomb_uses_no_memory" for item in items):
        folder = tmp_path_factory.mktemp("memo-bomb")
        background.started[__name__] = background.submit(_memo_index_bomb, folder)


def test_memo_index_bomb_uses_no_memory(background):
    """The C unpickler sizes its memo by the largest index (2 x 2**31 entries x 8 bytes = 32 GB); ours must not."""
    out = background.result(__name__)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["error"][0] == "CheckpointError" and "not a Megatron checkpoint" in report["error"][1]
    assert report["grew_kb"] < 100_000 and report["seconds"] < 10, report


@pytest.mark.parametrize(
    "edit",
    [
        ("rotary_pct", "half"),
        ("num_layers", -1),
        ("rotary_emb_base", float("inf")),
        ("hidden_size", 10**400),
        ("layernorm_epsilon", None),  # None = absent: allowed (ADEPT's default)
    ],
    ids=lambda e: f"{e[0]}={str(e[1])[:8]}",
)
def test_malformed_args(tmp_path, edit):
    name, value = edit
    rel = build_release(seed=0)
    setattr(rel.objects[(0, 0)]["args"], name, value)
    folder = write_release_folder(rel, tmp_path / "rel")
    ckpt = load_release_checkpoint(open_release(folder))
    if value is None:
        assert derive_dims(ckpt).layer_norm_eps == 1e-5
        return
    with pytest.raises(PersimmonToolsError) as err:
        derive_dims(ckpt)
    expect("pickle-args-types", err.value)
    assert f"args.{name} = " in err.value.message
    expect_cli("pickle-args-types", cli("convert", folder, tmp_path / "out"))


def test_embedding_of_the_wrong_rank(tmp_path):
    rel = build_release(seed=0)
    emb = rel.objects[(0, 0)]["model"]["language_model"]["embedding"]["word_embeddings"]
    emb["weight"] = torch.zeros(2, 512, 64, dtype=torch.bfloat16)
    folder = write_release_folder(rel, tmp_path / "rel")
    with pytest.raises(PersimmonToolsError) as err:
        derive_dims(load_release_checkpoint(open_release(folder)))
    expect("pickle-tensor-rank", err.value)
    expect_cli("pickle-tensor-rank", cli("convert", folder, tmp_path / "out"))


# ---- zip records and storages ---------------------------------------------------------------------------


def _zip_case(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "model_optim_rng.pt"
    pkl = model_with(tensor(storage()))
    if case == "zip-overlap":
        write_torch_zip(path, pkl, {"0": bytes(16), "1": bytes(16)})
        with zipfile.ZipFile(path) as zf:
            first = zf.getinfo("archive/data/0").header_offset
        patch_central_directory(path, "archive/data/1", header_offset=first)
    elif case == "zip-past-end":
        write_torch_zip(path, pkl)
        patch_central_directory(path, "archive/data/0", file_size=10**6, compress_size=10**6)
    elif case == "zip-header-past-end":
        write_torch_zip(path, pkl)
        patch_central_directory(path, "archive/data/0", header_offset=10**6)
    elif case == "zip-bad-local-header":
        write_torch_zip(path, pkl)
        with zipfile.ZipFile(path) as zf:
            at = zf.getinfo("archive/data/0").header_offset
        data = bytearray(path.read_bytes())
        data[at : at + 4] = b"XXXX"
        path.write_bytes(bytes(data))
    elif case == "zip-compressed":
        write_torch_zip(path, pkl, compress=True)
    elif case == "zip-two-pickles":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a/data.pkl", pkl)
            zf.writestr("b/data.pkl", pkl)
    elif case == "zip-huge-pickle":  # each pickle byte can allocate an object: 65 MB would be ~2.5 GB
        write_torch_zip(path, pickle.PROTO + b"\x02" + pickle.EMPTY_LIST + pickle.STOP + bytes(65 << 20))
    elif case == "zip-legacy":
        torch.save({"model": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    elif case == "zip-not-zip":
        path.write_bytes(os.urandom(4096).replace(b"PK", b"pk"))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "zip-overlap",
        "zip-past-end",
        "zip-header-past-end",
        "zip-bad-local-header",
        "zip-compressed",
        "zip-two-pickles",
        "zip-huge-pickle",
        "zip-legacy",
        "zip-not-zip",
    ],
)
def test_hostile_zip_records(tmp_path, case):
    path = _zip_case(tmp_path, case)
    with pytest.raises(PersimmonToolsError) as err:
        load_checkpoint(ByteSource.whole_file(path))
    expect(case, err.value)
    expect_cli(case, cli("convert", path, tmp_path / "out"))


@pytest.mark.parametrize(
    "case", ["storage-numel", "storage-offset", "storage-missing", "storage-zero-stride"]
)
def test_hostile_storages(tmp_path, case):
    pkl = {
        "storage-numel": model_with(tensor(storage(numel=1000), size=1000)),
        "storage-offset": model_with(tensor(storage(), offset=100)),
        "storage-missing": model_with(tensor(storage(key="9"))),
        # 2**31 elements over one 4-byte element: an 8 GB tensor when read, from a 16-byte record
        "storage-zero-stride": model_with(tensor(storage(), size=2**31 - 1, stride=0)),
    }[case]
    path = write_torch_zip(tmp_path / "model_optim_rng.pt", pkl)
    with pytest.raises(PersimmonToolsError) as err:
        load_checkpoint(ByteSource.whole_file(path))
    expect(case, err.value)
    expect_cli(case, cli("convert", path, tmp_path / "out"))
    result = cli("inspect", path)
    assert_clean_failure(result)
