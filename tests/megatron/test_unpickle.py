"""The restricted unpickler: allowlisted globals only, inert stand-ins, nothing executed, lazy tensors."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch

from persimmon_tools.errors import CheckpointError, UnsafeCheckpointError
from persimmon_tools.megatron.bytesource import ByteSource
from persimmon_tools.megatron.lazy import LazyTensor, StorageRef
from persimmon_tools.megatron.ptwriter import write_pt
from persimmon_tools.megatron.torchzip import load_checkpoint
from persimmon_tools.synth.build import build_release
from persimmon_tools.synth.shard import with_adept_module


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _pt_with(tmp_path, obj, name="evil.pt"):
    path = tmp_path / name
    with open(path, "wb") as fh:
        write_pt(fh, obj)
    return path


@pytest.mark.parametrize("func", [os.system, eval, exec])
def test_disallowed_global_is_refused_and_nothing_runs(tmp_path, func):
    sentinel = tmp_path / "pwned"
    payload = f"open({str(sentinel)!r}, 'w').write('x')" if func is not os.system else f"touch {sentinel}"
    path = _pt_with(tmp_path, {"model": {}, "args": _Evil(func, payload)})
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(ByteSource.whole_file(path))
    assert not sentinel.exists()
    assert func.__name__ in err.value.message and "nothing was executed" in err.value.message


def test_subprocess_and_torch_internals_are_refused(tmp_path):
    import subprocess

    for obj in (
        _Evil(subprocess.Popen, ["true"]),
        _Evil(torch.load, "x.pt"),
        _Evil(torch.hub.load, "owner/repo"),
    ):
        path = _pt_with(tmp_path, {"model": {"x": obj}})
        with pytest.raises(UnsafeCheckpointError):
            load_checkpoint(ByteSource.whole_file(path))


def test_synthetic_checkpoint_loads_lazily_with_stand_ins(tmp_path):
    rel = build_release(seed=0)
    path = tmp_path / "model_optim_rng.pt"
    with open(path, "wb") as fh:
        with_adept_module(lambda: write_pt(fh, rel.objects[(0, 0)]))
    loaded = load_checkpoint(ByteSource.whole_file(path))
    args = loaded.obj["args"]
    assert args.num_layers == 6 and args.params_dtype is torch.bfloat16
    assert repr(args.model_backend) == "tool_use.megatron.megatron_utils.ModelBackend('megatron')"
    assert loaded.globals_seen["tool_use.megatron.megatron_utils.ModelBackend"] == "inert stand-in"
    emb = loaded.obj["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert isinstance(emb, LazyTensor) and emb.shape == (1024, 64)
    # torch's own loader (with ADEPT's module faked) reads the same values: the format is genuine
    ref = {}
    with open(path, "rb") as fh:
        data = fh.read()
    with_adept_module(lambda: ref.setdefault("ck", torch.load(io.BytesIO(data), weights_only=False)))
    torch_emb = ref["ck"]["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert torch.equal(emb.materialize(), torch_emb)
    assert torch.equal(emb.read_rows(10, 20), torch_emb[10:20])


def test_optimizer_state_is_never_read(tmp_path, monkeypatch):
    huge = torch.zeros(1000, 1000)
    path = _pt_with(tmp_path, {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": huge}}}})
    reads = []
    import persimmon_tools.megatron.lazy as lazy

    real = lazy.pread_exact
    monkeypatch.setattr(lazy, "pread_exact", lambda *a: reads.append(a[2]) or real(*a))
    loaded = load_checkpoint(ByteSource.whole_file(path))
    assert isinstance(loaded.obj["optimizer"]["state"][0]["exp_avg"], LazyTensor)
    assert reads == []  # unpickling read no tensor bytes


class _OversizedView:
    """Pickles as a tensor view of 400 elements over a storage of 4."""

    def __reduce_ex__(self, protocol):
        import collections

        from persimmon_tools.megatron.ptwriter import TensorSpec, _StorageToken

        token = _StorageToken(TensorSpec.of(torch.ones(4)))
        return (
            torch._utils._rebuild_tensor_v2,
            (token, 0, torch.Size((400,)), (1,), False, collections.OrderedDict()),
        )


def test_storage_view_past_its_record_is_refused(tmp_path):
    path = _pt_with(tmp_path, {"model": {"w": _OversizedView()}})
    with pytest.raises(CheckpointError, match="runs past its storage"):
        load_checkpoint(ByteSource.whole_file(path))


def test_tar_member_reader(releases):
    with tarfile.open(releases["tar"]) as tf:
        member = next(m for m in tf if m.name.endswith(".pt"))
    src = ByteSource(releases["tar"], member.offset_data, member.size, "member")
    loaded = load_checkpoint(src)
    assert loaded.obj["iteration"] == 1251


def test_tensor_views_outside_or_amplifying_their_storage_are_refused(tmp_path):
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"\0" * 64)
    rec = StorageRef(pt, 0, 64, torch.float32, "0", "x.pt:archive/data/0")
    assert LazyTensor.from_storage(rec, 4, (3, 4), (4, 1)).materialize().shape == (3, 4)
    with pytest.raises(CheckpointError, match="runs past its storage of 16 elements"):
        LazyTensor.from_storage(rec, 8, (3, 4), (4, 1))
    with pytest.raises(CheckpointError, match="has 1000 elements but its storage holds 16"):
        LazyTensor.from_storage(rec, 0, (1000,), (0,))
    view = LazyTensor.from_storage(rec, 0, (4, 4), (4, 1))
    with pytest.raises(IndexError, match=r"rows \[2, 5\) of a tensor with 4"):
        view.read_rows(2, 5)  # never past the view into the bytes that follow it
    assert LazyTensor.from_storage(rec, 0, (3, 0), (1, 1)).materialize().shape == (3, 0)


def test_object_built_without_init_becomes_a_stand_in(tmp_path, monkeypatch):
    """Protocol 2 pickles plain objects with NEWOBJ + BUILD (no ``__init__``): a Megatron config object in a
    checkpoint is a stand-in holding its state, not an AttributeError traceback."""
    import sys
    import types

    mod = types.ModuleType("megatron.cfg")

    class Cfg:
        pass

    Cfg.__module__, Cfg.__qualname__, mod.Cfg = "megatron.cfg", "Cfg", Cfg
    monkeypatch.setitem(sys.modules, "megatron", types.ModuleType("megatron"))
    monkeypatch.setitem(sys.modules, "megatron.cfg", mod)
    cfg = Cfg()
    cfg.hidden_size = 64
    path = _pt_with(tmp_path, {"model": {"w": torch.ones(2)}, "cfg": cfg}, name="cfg.pt")
    monkeypatch.delitem(sys.modules, "megatron.cfg")
    loaded = load_checkpoint(ByteSource.whole_file(path))
    stand_in = loaded.obj["cfg"]
    assert (
        stand_in.state == {"hidden_size": 64}
        and stand_in.args == ()
        and repr(stand_in) == "megatron.cfg.Cfg(...)"
    )
    assert loaded.globals_seen["megatron.cfg.Cfg"] == "inert stand-in"


def test_storage_named_with_two_dtypes_or_malformed_is_refused(tmp_path):
    """torch.load builds one storage per key (the first reference's type): a key named again with another
    type would be read differently here, so it is refused; keys and sizes must be a str and an int."""
    from hostile_inputs import P, model_with, program, s, storage, tensor, write_torch_zip

    two = program(
        P.EMPTY_DICT,
        s("model"),
        P.EMPTY_DICT,
        s("a"),
        tensor(storage("0", 4, "FloatStorage")),
        P.SETITEM,
        s("b"),
        tensor(storage("0", 4, "IntStorage")),
        P.SETITEM,
        P.SETITEM,
    )
    path = write_torch_zip(tmp_path / "two.pt", two)
    with pytest.raises(CheckpointError, match="storage 0 is referenced as torch.float32 and as torch.int32"):
        load_checkpoint(ByteSource.whole_file(path))
    same = program(
        P.EMPTY_DICT,
        s("model"),
        P.EMPTY_DICT,
        s("a"),
        tensor(storage("0", 4)),
        P.SETITEM,
        s("b"),
        tensor(storage("0", 2), size=2),
        P.SETITEM,
        P.SETITEM,
    )
    loaded = load_checkpoint(ByteSource.whole_file(write_torch_zip(tmp_path / "same.pt", same)))
    a, b = loaded.obj["model"]["a"], loaded.obj["model"]["b"]
    assert a.storage is b.storage and a.storage.numel == 4  # one storage, as torch.load shares it
    bad_key = storage("0").replace(s("0"), P.BININT1 + b"\x00")
    path = write_torch_zip(tmp_path / "key.pt", model_with(tensor(bad_key)))
    with pytest.raises(UnsafeCheckpointError, match="malformed storage reference"):
        load_checkpoint(ByteSource.whole_file(path))
