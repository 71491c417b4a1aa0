"""Helpers for the export tests: read releases (tar or folder) with plain torch, compare tensors by bytes,
ADEPT's expected shard layout computed independently of the toolkit (spec §B.2), and (issue 22) builders of
broken sources (safetensors written by hand, edited config.json / weights, edited synthetic releases) with
:func:`refused`, which asserts that a refused export leaves nothing behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from persimmon_tools.errors import PersimmonToolsError
from persimmon_tools.export.export import ExportOptions, export_release
from persimmon_tools.staged_output import RUN_MARKER
from persimmon_tools.synth.shard import with_adept_module
from persimmon_tools.synth.values import PRESETS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The tiny preset, written out by hand (checked against PRESETS below); V: the bundled vocabulary padded
# to a multiple of 1024.
TINY = {"H": 64, "heads": 4, "F": 256, "L": 6, "V": 1024, "rot": 8}
_p = PRESETS["tiny"]
assert (_p.hidden, _p.heads, _p.ffn, _p.layers, int(_p.rotary_pct * _p.hidden // _p.heads)) == (
    TINY["H"],
    TINY["heads"],
    TINY["F"],
    TINY["L"],
    TINY["rot"],
)


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (for bit-exact comparison whatever the dtype)."""
    return t.detach().contiguous().flatten().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(raw(a), raw(b))


def _load(data: bytes) -> Any:
    box: list[Any] = []
    with_adept_module(lambda: box.append(torch.load(io.BytesIO(data), weights_only=False)))
    return box[0]


def read_release(path: Path) -> tuple[str, dict[str, Any], dict[str, bytes]]:
    """``(NAME, {relative .pt path: object}, {relative small file: bytes})`` of a release tarball or of a
    folder holding exactly one release folder NAME (plus, for an export, ``export.json``)."""
    path = Path(path)
    shards: dict[str, Any] = {}
    small: dict[str, bytes] = {}
    names = set()
    if path.is_file():
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if not m.isfile():
                    continue
                name, _, rel = m.name.partition("/")
                names.add(name)
                data = tf.extractfile(m).read()
                if rel.endswith(".pt"):
                    shards[rel] = _load(data)
                else:
                    small[rel] = data
    else:
        tops = [p for p in path.iterdir() if p.is_dir()]
        assert len(tops) == 1, tops
        names.add(tops[0].name)
        for f in sorted(tops[0].rglob("*")):
            if f.is_file():
                rel = str(f.relative_to(tops[0]))
                if rel.endswith(".pt"):
                    shards[rel] = _load(f.read_bytes())
                else:
                    small[rel] = f.read_bytes()
    assert len(names) == 1, names
    return names.pop(), shards, small


def flat(obj: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def structure(obj: Any) -> Any:
    """Containers (type and keys) and tensor dtypes/shapes: what ``model`` looks like, without values.

    Key order is not compared: the synthetic generator writes the encoder rule-major (every layer's
    ``input_layernorm.weight``, then every layer's ``.bias``, ...) while export writes module order (layer by
    layer, like ``state_dict``); ``load_state_dict`` does not depend on it."""
    if isinstance(obj, dict):
        return (type(obj).__name__, sorted((k, structure(v)) for k, v in obj.items()))
    assert isinstance(obj, torch.Tensor), type(obj)
    return ("tensor", str(obj.dtype), tuple(obj.shape))


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(out)
        out.update(part)
    return out


def assert_same_hf(a: Path, b: Path) -> None:
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    bad = [k for k in ta if not same_bits(ta[k], tb[k])]
    assert not bad, bad


def listing(folder: Path) -> list[str]:
    """Everything under ``folder`` (hidden entries included), relative; links not followed."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in dirs + files]
    return sorted(out)


_LAYER = [
    ("input_layernorm.weight", lambda d, tp: [d["H"]]),
    ("input_layernorm.bias", lambda d, tp: [d["H"]]),
    ("self_attention.query_key_value.weight", lambda d, tp: [3 * d["H"] // tp, d["H"]]),
    ("self_attention.query_key_value.bias", lambda d, tp: [3 * d["H"] // tp]),
    ("self_attention.q_layernorm.weight", lambda d, tp: [d["H"] // d["heads"]]),
    ("self_attention.q_layernorm.bias", lambda d, tp: [d["H"] // d["heads"]]),
    ("self_attention.k_layernorm.weight", lambda d, tp: [d["H"] // d["heads"]]),
    ("self_attention.k_layernorm.bias", lambda d, tp: [d["H"] // d["heads"]]),
    ("self_attention.dense.weight", lambda d, tp: [d["H"], d["H"] // tp]),
    ("self_attention.dense.bias", lambda d, tp: [d["H"]]),
    ("post_attention_layernorm.weight", lambda d, tp: [d["H"]]),
    ("post_attention_layernorm.bias", lambda d, tp: [d["H"]]),
    ("mlp.dense_h_to_4h.weight", lambda d, tp: [d["F"] // tp, d["H"]]),
    ("mlp.dense_h_to_4h.bias", lambda d, tp: [d["F"] // tp]),
    ("mlp.dense_4h_to_h.weight", lambda d, tp: [d["H"], d["F"] // tp]),
    ("mlp.dense_4h_to_h.bias", lambda d, tp: [d["H"]]),
    ("self_attention.rotary_emb.inv_freq", lambda d, tp: [d["rot"] // 2]),
]


def expected_shard(d: dict[str, int], tp: int, pp: int, stage: int) -> dict[str, list[int]]:
    """Flat key -> shape of the shard ADEPT's model at TP/PP holds on pipeline stage ``stage``: stage-local
    layer numbers, the embedding on the first stage, the final layernorm and head on the last."""
    out: dict[str, list[int]] = OrderedDict()
    if stage == 0:
        out["language_model.embedding.word_embeddings.weight"] = [d["V"] // tp, d["H"]]
    for j in range(d["L"] // pp):
        for suffix, shape in _LAYER:
            out[f"language_model.encoder.layers.{j}.{suffix}"] = shape(d, tp)
    if stage == pp - 1:
        out["language_model.encoder.final_layernorm.weight"] = [d["H"]]
        out["language_model.encoder.final_layernorm.bias"] = [d["H"]]
        out["word_embeddings_for_head.weight"] = [d["V"] // tp, d["H"]]
    return out


def shard_paths(iteration: int, tp: int, pp: int) -> dict[str, tuple[int, int]]:
    """Relative ``.pt`` path (under NAME/) -> (tp rank, pp stage)."""
    return {
        f"iter_{iteration:07d}/mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") + "/model_optim_rng.pt": (
            t,
            s,
        )
        for t in range(tp)
        for s in range(pp)
    }


# ---- builders of broken sources (tests/export/test_export_trust.py) ------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes: Any) -> dict:
    """Change ``config.json``'s keys (None removes one); returns the new config."""
    import json

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return config


def edit_weights(folder: Path, edit) -> None:
    """``edit(tensors)`` on the single ``model.safetensors`` of ``folder``, saved back with safetensors."""
    from safetensors.torch import save_file

    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def safetensors_parts(path: Path) -> tuple[dict[str, dict], bytes]:
    """``(header without __metadata__, data bytes)`` of a safetensors file, read by hand."""
    import json
    import struct

    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n :]


def write_safetensors_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    """Write a safetensors file from a header (a dict, or JSON bytes as given) and data bytes, unchecked."""
    import json
    import struct

    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def by_offset(header: dict[str, dict]) -> list[str]:
    """Tensor names of a header in data order."""
    return sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))


def megatron_release(folder: Path, edit=None, *, tp: int = 1, pp: int = 1) -> Path:
    """A tiny synthetic release folder (seed 0) after ``edit(objects)`` on its per-rank checkpoint dicts
    (``{(tp_rank, pp_rank): {"args", "checkpoint_version", "iteration", "model"}}``, TensorSpec leaves)."""
    from persimmon_tools.synth.build import build_release, write_release_folder

    rel = build_release(seed=0, tp=tp, pp=pp)
    if edit is not None:
        edit(rel.objects)
    return write_release_folder(rel, folder)


def spec_of(tensor: torch.Tensor):
    from persimmon_tools.megatron.ptwriter import TensorSpec

    return TensorSpec.of(tensor)


HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

PLAIN = ExportOptions()


def refused(source, outs, options=PLAIN, error=PersimmonToolsError, match=None):
    """Export ``source`` into ``outs/new/out``; it must raise ``error`` and leave ``outs`` empty."""
    with pytest.raises(error, match=match) as err:
        export_release(source, outs / "new" / ("out.tar" if options.tar else "out"), options)
    assert listing(outs) == [], "a refused export left something behind"
    return err.value


def drop_head(folder):
    edit_weights(folder, lambda t: t.pop(HEAD))
    edit_config(folder, tie_word_embeddings=True)


def run(*args):
    """``persimmon-tools ARGS`` in-process (click's runner); ``str`` of every argument."""
    from click.testing import CliRunner

    from persimmon_tools.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def outs(tmp_path):
    """An empty folder to put OUT in; the tests check it is still empty after a refusal."""
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder


@pytest.fixture
def hf(converted_tiny, tmp_path):
    """A writable copy of the converted tiny fixture (bf16, one model.safetensors, conversion.json)."""
    return copy_folder(converted_tiny, tmp_path / "hf")


_KILLED_MID_WRITE = """
import importlib, os, signal, sys
writer = importlib.import_module({module!r})

def write_pt(fh, obj, on_bytes=None):
    fh.write(b"partial bytes" * 100)
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

writer.write_pt = write_pt
from persimmon_tools.cli import main
main(sys.argv[1:])
"""


def killed_mid_write(background, writer_module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``persimmon-tools ARGS`` in a child (a ``background`` job's) whose ``writer_module.write_pt`` writes a
    few bytes of its first file and then SIGKILLs the process: what a killed export leaves stays for the test."""
    script = _KILLED_MID_WRITE.format(module=writer_module)
    repo = Path(__file__).resolve().parents[2]
    return background.run(
        [background.python(), "-c", script, *args], cwd=repo, env=background.environ, timeout=300
    )


def left_by_the_kill(args: list[str], proc: subprocess.CompletedProcess) -> tuple[Path, Path, dict]:
    """What :func:`killed_mid_write` left for ``export ... OUT``: (OUT, the one temporary folder beside it, its
    run marker); asserts that the child died of SIGKILL and that OUT does not exist."""
    out = Path(args[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stale = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert len(stale) == 1 and not os.path.lexists(out)
    return out, stale[0], json.loads((stale[0] / RUN_MARKER).read_text())
