"""Pytest fixtures for the push tests: a local Hub server and fabricated converted folders.

Every test module in ``tests/hub/`` gets them through this folder's ``conftest.py``.

The ``hub`` fixture starts :class:`hub_server.HubServer` on 127.0.0.1 (port 0), points ``HF_ENDPOINT``,
``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` at it, sets ``HF_TOKEN``,
disables Xet (``HF_HUB_DISABLE_XET=1`` and the constant, which ``huggingface_hub`` reads at import time
and checks at call time), unsets ``HF_HUB_OFFLINE``, uses a fresh ``HF_HOME`` (no stored login) and refuses
any name resolution or socket connection that is not for 127.0.0.1, so a test can never reach the network.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer

from persimmon_tools.conversion.fingerprint import fingerprint_folder

TOKEN = "hf_test_token"
USER = "alice"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to connect to {address!r}; only 127.0.0.1 is allowed")
        return real_connect(sock, address)

    real_getaddrinfo = socket.getaddrinfo

    def resolve_loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "::1", "localhost", None):
            raise AssertionError(f"test tried to resolve {host!r}; only 127.0.0.1 is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(socket, "getaddrinfo", resolve_loopback_only)
    disable_progress_bars()
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)  # both are computed at import time
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        server.token = TOKEN
        yield server


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_verification(folder: Path, *, verdict: str = "pass", **overrides: Any) -> dict[str, Any]:
    """(Re)write ``verification.json`` as ``persimmon-tools verify`` does, fingerprinting the folder now."""
    report: dict[str, Any] = {
        "tool": "persimmon-tools",
        "tool_version": "0.1.0",
        "created": "2024-05-01T12:00:00+00:00",
        "verdict": verdict,
        "device": "cpu",
        "dtype": "fp32",
        "rotary": "hf",
        "converted_loader": "transformers",
        "source": {
            "path": "/data/8b_chat_model_release.tar",
            "files": [
                {"name": "iter_0001251/mp_rank_00/model_optim_rng.pt", "size": 4242, "sha256": "ab" * 32}
            ],
            "iteration": 1251,
            "tp": 1,
            "pp": 1,
            "variant": "chat",
        },
        "tolerances": {"name": "fp32", "max_rel": 1e-4, "mean_rel": 1e-5, "kl": 1e-6},
        "metrics": [
            {
                "prompt": "human: Hello | there\n\nadept:",
                "tokens": 12,
                "max_abs_diff": 0.0123,
                "mean_abs_diff": 0.0011,
                "kl_div": 2.5e-6,
                "top1_agreement": 1.0,
                "top5_agreement": 1.0,
                "passed": verdict == "pass",
            }
        ],
        "files": fingerprint_folder(folder),
    }
    report.update(overrides)
    _write_json(folder / "verification.json", report)
    return report


def make_converted_folder(
    folder: Path,
    *,
    variant: str = "chat",
    shards: int = 2,
    verified: bool = True,
    readme: str | None = None,
    seed: int = 0,
) -> Path:
    """A small converted folder in the layout ``persimmon-tools convert`` writes (real safetensors shards)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else []
    for i, name in enumerate(names or ["model.safetensors"]):
        tensors = {
            f"model.layers.{i}.mlp.dense_h_to_4h.weight": torch.randn(64, 16, generator=gen),
            f"model.layers.{i}.mlp.dense_h_to_4h.bias": torch.randn(64, generator=gen),
        }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if names:
        _write_json(
            folder / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map}
        )
    _write_json(
        folder / "config.json", {"architectures": ["PersimmonForCausalLM"], "model_type": "persimmon"}
    )
    _write_json(folder / "generation_config.json", {"bos_token_id": 71013, "eos_token_id": 71013})
    (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 8 + seed.to_bytes(4, "little"))
    _write_json(
        folder / "tokenizer.json", {"version": "1.0", "model": {"type": "Unigram", "vocab": [["<unk>", 0]]}}
    )
    _write_json(
        folder / "tokenizer_config.json", {"bos_token": "|ENDOFTEXT|", "tokenizer_class": "LlamaTokenizer"}
    )
    _write_json(folder / "special_tokens_map.json", {"bos_token": "|ENDOFTEXT|", "unk_token": "<unk>"})
    tar = f"8b_{variant}_model_release.tar" if variant in ("base", "chat") else "release.tar"
    iteration = {"base": 375000, "chat": 1251}.get(variant)
    _write_json(
        folder / "conversion.json",
        {
            "tool": "persimmon-tools",
            "tool_version": "0.1.0",
            "created": "2024-05-01T11:00:00+00:00",
            "source": {
                "path": f"/data/{tar}",
                "kind": "tar",
                "name": tar,
                "variant": variant,
                "iteration": iteration,
                "tp": 1,
                "pp": 1,
                "checkpoint_files": [{"name": "model_optim_rng.pt", "size": 4242}],
            },
            "dtype": "bfloat16",
            "num_parameters": 9397175296,
        },
    )
    if readme is not None:
        (folder / "README.md").write_text(readme)
    if verified:
        source = {
            "path": f"/data/{tar}",
            "files": [],
            "iteration": iteration,
            "tp": 1,
            "pp": 1,
            "variant": variant,
        }
        write_verification(folder, source=source)
    return folder


class FolderFactory:
    """``converted(name="out", **make_converted_folder kwargs) -> Path``; ``converted.reverify(folder, ...)``
    rewrites verification.json (see :func:`write_verification`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, name: str = "out", **kwargs: Any) -> Path:
        return make_converted_folder(self.root / name, **kwargs)

    reverify = staticmethod(write_verification)


@pytest.fixture
def converted(tmp_path: Path) -> FolderFactory:
    """Makes converted folders under ``tmp_path``."""
    return FolderFactory(tmp_path)
