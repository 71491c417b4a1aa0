"""`verify` must fail (exit 3) on deliberately broken conversions and name the layer / tensor / config value.

Each case converts the tiny release with the real converter, then breaks the output the way a buggy
converter would (editing model.safetensors or config.json), and runs the CLI.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions, convert
from persimmon_tools.conversion.fingerprint import VERIFICATION_FILE
from persimmon_tools.verification.verify import VerifyOptions, verify

pytest.importorskip("transformers")

HEADS = 4  # the tiny preset
# These tests are about the diagnosis of broken conversions by their logits; the generation check has its own
# tests (test_generation_check.py, test_verification_card.py), so these verify runs skip it.
NO_GENERATION = 0
L = "model.layers.{}."
REPO = Path(__file__).resolve().parents[2]
FIXTURE_TAR = REPO / "fixtures" / "tiny_release.tar"


def _blocked_qkv(t: dict) -> None:
    for k in [k for k in t if "query_key_value" in k]:
        x = t[k]
        t[k] = x.reshape(HEADS, 3, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape).contiguous()


def _swap(t: dict, a: str, b: str) -> None:
    t[a], t[b] = t[b].clone(), t[a].clone()


def _qk_swap(t: dict) -> None:
    for s in ("weight", "bias"):
        _swap(t, L.format(2) + f"self_attn.q_layernorm.{s}", L.format(2) + f"self_attn.k_layernorm.{s}")


def _mlp_from_layer1(t: dict) -> None:
    for k in [k for k in t if k.startswith(L.format(1) + "mlp.")]:
        t[k.replace("layers.1.", "layers.3.")] = t[k].clone()


def _zero_dense_bias(t: dict) -> None:
    t[L.format(4) + "self_attn.dense.bias"] = torch.zeros_like(t[L.format(4) + "self_attn.dense.bias"])


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


# name: (edit tensors, edit config, expected first diverging stage, expected culprit, words in its message)
CASES = {
    "qkv_blocked": (
        _blocked_qkv,
        None,
        "layer 0 attention",
        L.format(0) + "self_attn.query_key_value.weight",
        "blocked [Q; K; V]",
    ),
    "embed_head_swapped": (
        lambda t: _swap(t, "model.embed_tokens.weight", "lm_head.weight"),
        None,
        "embedding",
        "model.embed_tokens.weight",
        "word_embeddings_for_head.weight",
    ),
    "qk_layernorm_swapped": (
        _qk_swap,
        None,
        "layer 2 attention",
        L.format(2) + "self_attn.q_layernorm.weight",
        "layers.2.self_attention.k_layernorm.weight",
    ),
    "rope_theta_wrong": (
        None,
        _set("rope_theta", 10000.0),
        "layer 0 attention",
        "config.json rope_theta",
        "25000",
    ),
    "partial_rotary_1": (
        None,
        _set("partial_rotary_factor", 1.0),
        "layer 0 attention",
        "config.json partial_rotary_factor",
        "rotates 16 of 16",
    ),
    "mlp_from_other_layer": (
        _mlp_from_layer1,
        None,
        "layer 3 mlp",
        L.format(3) + "mlp.dense_h_to_4h.weight",
        "taken from layer 1 instead of layer 3",
    ),
    "dense_bias_zeroed": (
        _zero_dense_bias,
        None,
        "layer 4 attention",
        L.format(4) + "self_attn.dense.bias",
        "all zeros",
    ),
}


@pytest.fixture(scope="module")
def good(releases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("broken") / "good"
    convert(releases["tar"], out, ConvertOptions())
    return out


def _break(good: Path, dst: Path, edit_tensors, edit_config) -> Path:
    shutil.copytree(good, dst)
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


LOADERS = ("transformers", "persimmon-tools")


def broken_runs(good: Path, reference: Path, scratch: Path) -> dict[str, dict]:
    """Every case of ``CASES`` with each loader: ``good`` broken into ``scratch``, then ``verify`` run by the
    CLI: its exit code, stdout, stderr and the report it wrote. Runs in a child beside the tests."""
    runs = {}
    for case, (edit_t, edit_c, *_) in CASES.items():
        for loader in LOADERS:
            folder = _break(good, scratch / f"{case}-{loader}", edit_t, edit_c)
            result = CliRunner().invoke(
                main,
                [
                    *("verify", str(folder), "--reference", str(reference), "--loader", loader),
                    *(
                        "--no-source-hash",
                        "--new-tokens",
                        "0",
                    ),  # the logits' diagnosis (generation: own tests)
                ],
            )
            report = folder / VERIFICATION_FILE  # written although it failed
            runs[f"{case}-{loader}"] = {
                "exit_code": result.exit_code,
                "output": result.output,
                "stderr": result.stderr,
                "report": json.loads(report.read_text()) if report.exists() else None,
            }
    return runs


_BROKEN_CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("verify_broken_cases", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(module.broken_runs(*map(Path, sys.argv[2:]))))
    """
)


def _broken_in_a_child(background, converted, scratch: Path) -> dict[str, dict]:
    """A ``background`` job (tests/conftest.py): :func:`broken_runs` in a child, on the bundled tiny release's
    conversion (``converted``: the future of ``Background.converted_tiny``, what ``good`` converts too)."""
    done = background.run(
        [
            background.python(),
            "-c",
            _BROKEN_CHILD,
            __file__,
            str(converted.result()),
            str(FIXTURE_TAR),
            str(scratch),
        ],
        cwd=REPO,
        env=background.environ,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the broken conversions are
    verified in a child beside the tests (they are most of this module's CPU)."""
    if any(item.originalname == "test_broken_conversion_fails_with_diagnosis" for item in items):
        converted = background.converted_tiny(tmp_path_factory)
        background.started[f"{__name__}: broken"] = background.submit(
            _broken_in_a_child, converted, tmp_path_factory.mktemp("broken-runs")
        )


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", list(CASES))
def test_broken_conversion_fails_with_diagnosis(background, case, loader):
    """Verified in a child beside the tests (``start_in_background``); the assertions are on what it saw."""
    _, _, stage, culprit, words = CASES[case]
    run = background.result(f"{__name__}: broken")[f"{case}-{loader}"]
    assert run["exit_code"] == 3, run["output"]
    assert "verdict: FAIL" in run["output"]
    assert culprit in run["stderr"] and words in run["stderr"]  # the Error: line names it
    report = run["report"]  # written although it failed
    assert report["verdict"] == "fail"
    diag = report["diagnosis"]
    assert diag["first_divergence"]["stage"] == stage
    assert diag["most_likely"]["where"] == culprit and words in diag["most_likely"]["message"]
    assert not any(m["passed"] for m in report["metrics"])  # caught by the logits, not only the exact checks


def test_exact_checks_catch_what_bf16_noise_hides(good, releases, tmp_path):
    """In bf16 the q/k swap of the tiny model (5e-3 of the logit scale) is inside rounding noise: the
    logits pass, the weight check still fails the verdict and names the tensor."""
    edit_t, _, _, culprit, words = CASES["qk_layernorm_swapped"]
    folder = _break(good, tmp_path / "qk", edit_t, None)
    report = verify(
        folder, releases["tar"], VerifyOptions(dtype="bf16", hash_source=False, new_tokens=NO_GENERATION)
    )
    assert all(m.passed for m in report.metrics)
    assert not report.passed
    assert (
        report.diagnosis["most_likely"]["where"] == culprit
        and words in report.diagnosis["most_likely"]["message"]
    )


def test_big_model_path_without_full_weight_check_still_names_the_tensor(good, releases, tmp_path):
    """--no-check-weights (what 8B runs do): only the diverging stage's tensors are compared, on failure."""
    edit_t, _, stage, culprit, words = CASES["mlp_from_other_layer"]
    folder = _break(good, tmp_path / "mlp", edit_t, None)
    report = verify(
        folder,
        releases["tar"],
        VerifyOptions(
            loader="persimmon-tools", check_weights=False, hash_source=False, new_tokens=NO_GENERATION
        ),
    )
    assert not report.passed and report.weights["compared"] == 0
    assert report.diagnosis["first_divergence"]["stage"] == stage
    assert report.diagnosis["most_likely"]["where"] == culprit


def test_missing_tensor_is_reported(good, releases, tmp_path):
    folder = _break(good, tmp_path / "missing", lambda t: t.pop(L.format(5) + "mlp.dense_4h_to_h.bias"), None)
    report = verify(folder, releases["tar"], VerifyOptions(hash_source=False, new_tokens=NO_GENERATION))
    assert not report.passed and report.metrics == ()
    assert report.diagnosis["most_likely"]["where"] == L.format(5) + "mlp.dense_4h_to_h.bias"
    assert "missing" in report.diagnosis["most_likely"]["message"]


def _transpose_dense(t: dict) -> None:
    t[L.format(1) + "self_attn.dense.weight"] = t[L.format(1) + "self_attn.dense.weight"].T.contiguous()


def _swap_layers(t: dict) -> None:
    for k in [k for k in t if k.startswith(L.format(2))]:
        _swap(t, k, k.replace("layers.2.", "layers.3."))


# More breaks a converter could make (not in the list): (tensors, config, culprit, words)
MORE = {
    "eps": (None, _set("layer_norm_eps", 1e-6), "config.json layer_norm_eps", "1e-05"),
    "act": (None, _set("hidden_act", "gelu"), "config.json hidden_act", "'gelu'"),
    "tied": (None, _set("tie_word_embeddings", True), "config.json tie_word_embeddings", "is True"),
    "no_rope_theta": (None, lambda c: c.pop("rope_theta"), "config.json rope_theta", "transformers' default"),
    "rope_scaling": (
        None,
        _set("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        "config.json rope_scaling",
        "'linear'",
    ),
    "max_positions": (
        None,
        _set("max_position_embeddings", 1024),
        "config.json max_position_embeddings",
        "2048",
    ),
    "head_is_embedding": (
        lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()),
        None,
        "lm_head.weight",
        "word_embeddings.weight instead of word_embeddings_for_head",
    ),
    "dense_transposed": (_transpose_dense, None, L.format(1) + "self_attn.dense.weight", "transpose"),
    "layers_swapped": (
        _swap_layers,
        None,
        L.format(2) + "input_layernorm.weight",
        "taken from layer 3 instead of layer 2",
    ),
}


@pytest.mark.parametrize("case", list(MORE))
def test_more_broken_conversions(good, releases, tmp_path, case):
    edit_t, edit_c, culprit, words = MORE[case]
    folder = _break(good, tmp_path / case, edit_t, edit_c)
    report = verify(folder, releases["tar"], VerifyOptions(hash_source=False, new_tokens=NO_GENERATION))
    assert not report.passed, case
    likely = report.diagnosis["most_likely"]
    assert likely["where"] == culprit and words in likely["message"], report.diagnosis["summary"]


def test_nan_weights_copied_with_allow_nonfinite_are_named(tmp_path):
    """A faithful copy of NaN weights is diagnosed as such, not as a layout mistake."""
    import torch
    from click.testing import CliRunner

    from persimmon_tools.cli import main
    from persimmon_tools.synth.build import build_release, write_release_folder

    rel = build_release(seed=0)
    bad = torch.ones(64, dtype=torch.bfloat16)
    bad[:3] = float("nan")
    rel.objects[(0, 0)]["model"]["language_model"]["encoder"]["layers.2.input_layernorm.weight"] = bad
    folder = write_release_folder(rel, tmp_path / "rel")
    result = CliRunner().invoke(main, ["convert", str(folder), str(tmp_path / "out"), "--allow-nonfinite"])
    assert result.exit_code == 3, result.output
    assert "model.layers.2.input_layernorm.weight: holds 3 NaN/Inf values" in result.stderr
    assert "different order" not in result.stderr
