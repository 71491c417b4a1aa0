"""A converted folder follows today's transformers conventions (issue 23, part F, item 4).

a. A chat conversion writes ``chat_template.jinja`` (what transformers 5's ``save_pretrained`` writes and
   what its ``from_pretrained`` prefers) and keeps ``chat_template`` in ``tokenizer_config.json`` (what older
   transformers and other readers take), byte for byte the same template; the file is listed in
   ``conversion.json``.
b. ``special_tokens_map.json`` keeps ``add_bos_token``: ids and chat rendering are the same without it, but
   ``tok.add_bos_token`` then reads False while BOS is added, and ``tok.add_eos_token = True`` (which
   rebuilds the post-processor from those flags) silently drops BOS.
c. ``generation_config.json`` carries ``max_new_tokens`` = the checkpoint's sequence length, so a bare
   ``model.generate(**inputs)`` does not fall back to the model-agnostic 20 tokens (and its warning), and
   ``generate(max_new_tokens=N)`` stays silent too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers_warnings import warnings_as_errors

import persimmon_tools
from persimmon_tools.cli import main
from persimmon_tools.conversion.convert import ConvertOptions
from persimmon_tools.synth.build import build_release, write_release_folder
from persimmon_tools.tokenizer.write import CHAT_TEMPLATE_FILE, TOKENIZER_FILES

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"
VOCAB = Path(__file__).resolve().parents[2] / "persimmon_tools" / "data" / "tiny_vocab.model"
CHAT = [
    {"role": "user", "content": "What is a persimmon?"},
    {"role": "assistant", "content": "A fruit."},
    {"role": "user", "content": "Which colour?"},
]
TEXTS = ["hi", "human: hi\n\nadept:", "a |ENDOFTEXT| b", "", "  spaces\tand\nnewlines  "]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The bundled fixture converted in-process (no verify): with and without ``--chat``."""
    base = tmp_path_factory.mktemp("conventions")
    out = {}
    for name, chat in (("chat", True), ("plain", False)):
        out[name] = base / name
        persimmon_tools.convert(FIXTURE, out[name], ConvertOptions(chat=chat), verify="off")
    return out


# ---- a. chat_template.jinja ------------------------------------------------------------------------------


def test_chat_conversion_writes_the_template_in_both_places_byte_for_byte(converted):
    folder = converted["chat"]
    raw = (folder / CHAT_TEMPLATE_FILE).read_bytes()
    key = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert raw == key.encode("utf-8") and raw.startswith(b"{{ bos_token }}")
    record = json.loads((folder / "conversion.json").read_text())
    assert CHAT_TEMPLATE_FILE in record["output_files"]
    assert not (converted["plain"] / CHAT_TEMPLATE_FILE).exists()
    assert (
        CHAT_TEMPLATE_FILE
        not in json.loads((converted["plain"] / "conversion.json").read_text())["output_files"]
    )
    assert TOKENIZER_FILES[-1] == CHAT_TEMPLATE_FILE


def test_readers_of_the_file_and_readers_of_the_key_render_the_same_chat(converted, tmp_path):
    from transformers import AutoTokenizer

    both = AutoTokenizer.from_pretrained(converted["chat"])
    assert both.chat_template == (converted["chat"] / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    key_only, file_only = tmp_path / "key_only", tmp_path / "file_only"
    shutil.copytree(converted["chat"], key_only)
    (key_only / CHAT_TEMPLATE_FILE).unlink()  # what a reader of tokenizer_config.json alone sees
    shutil.copytree(converted["chat"], file_only)
    config = json.loads((file_only / "tokenizer_config.json").read_text())
    del config["chat_template"]  # what a reader of chat_template.jinja alone sees
    (file_only / "tokenizer_config.json").write_text(json.dumps(config))
    rendered = []
    for folder in (converted["chat"], key_only, file_only):
        tok = AutoTokenizer.from_pretrained(folder)
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)
        rendered.append((text, ids["input_ids"]))
    prompt = "human: What is a persimmon?\n\nadept: A fruit.\n\nhuman: Which colour?\n\nadept:"
    assert rendered[0][0] == "|ENDOFTEXT|" + prompt and rendered[0][1] == both(prompt)["input_ids"]
    assert rendered[0] == rendered[1] == rendered[2]


def test_tokenizer_command_writes_the_file_and_refuses_a_stale_one(tmp_path):
    out = tmp_path / "tok"
    result = CliRunner().invoke(main, ["tokenizer", str(VOCAB), str(out), "--chat", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert {Path(p).name for p in json.loads(result.stdout)["written"]} == set(TOKENIZER_FILES)
    key = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert (out / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") == key
    plain = tmp_path / "plain"
    result = CliRunner().invoke(main, ["tokenizer", str(VOCAB), str(plain), "-q"])
    assert result.exit_code == 0 and not (plain / CHAT_TEMPLATE_FILE).exists()
    # without --chat, a chat_template.jinja left in OUT_DIR would still be loaded as the template
    (plain / CHAT_TEMPLATE_FILE).write_text("{{ 'stale' }}")
    result = CliRunner().invoke(main, ["tokenizer", str(VOCAB), str(plain)])
    assert result.exit_code == 1 and f"holds {CHAT_TEMPLATE_FILE}" in result.stderr
    assert "--chat" in result.stderr


# ---- b. add_bos_token in special_tokens_map.json ---------------------------------------------------------


def test_add_bos_token_stays_in_special_tokens_map_for_a_consistent_tokenizer(converted, tmp_path):
    from transformers import AutoTokenizer

    folder = converted["chat"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert json.loads((folder / "special_tokens_map.json").read_text())["add_bos_token"] is True
    without = tmp_path / "without"
    shutil.copytree(folder, without)
    special = json.loads((without / "special_tokens_map.json").read_text())
    del special["add_bos_token"]
    (without / "special_tokens_map.json").write_text(json.dumps(special))
    ours, bare = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(without)
    bos = ours.bos_token_id
    for tok in (ours, bare):  # the same ids, with and without BOS, and the same chat
        assert [tok(t)["input_ids"] for t in TEXTS] == [ours(t)["input_ids"] for t in TEXTS]
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == [
            ours(t, add_special_tokens=False)["input_ids"] for t in TEXTS
        ]
        assert tok.apply_chat_template(CHAT, tokenize=False) == ours.apply_chat_template(CHAT, tokenize=False)
    assert ours("hi")["input_ids"][0] == bos and ours("hi", add_special_tokens=False)["input_ids"][0] != bos
    # the difference: the flag, and what rebuilding the post-processor from it does
    assert (ours.add_bos_token, bare.add_bos_token) == (True, False)
    ours.add_eos_token = bare.add_eos_token = True
    assert ours("hi")["input_ids"][0] == bos and ours("hi")["input_ids"][-1] == ours.eos_token_id
    assert bare("hi")["input_ids"][0] != bos  # BOS silently lost without the key


# ---- c. a default length in generation_config.json -------------------------------------------------------


def _eos_first(model, eos: int) -> None:
    """Make the loaded model's greedy choice EOS at once (so a bare generate ends after one token)."""
    with torch.no_grad():
        model.model.final_layernorm.weight.zero_()
        model.model.final_layernorm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0


def test_bare_generate_uses_the_checkpoint_s_length_without_a_warning(converted):
    from transformers import AutoTokenizer, PersimmonForCausalLM

    folder = converted["plain"]
    gen = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert gen["max_new_tokens"] == config["max_position_embeddings"] == 2048 and "max_length" not in gen
    tok = AutoTokenizer.from_pretrained(folder)
    model = PersimmonForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.generation_config.max_new_tokens == 2048
    _eos_first(model, gen["eos_token_id"])
    inputs = tok("hello there", return_tensors="pt")
    with warnings_as_errors() as logs:
        out = model.generate(**inputs)
        short = model.generate(**inputs, max_new_tokens=3)
    assert not logs.records, [r.getMessage() for r in logs.records]
    assert (
        out[0, -1] == gen["eos_token_id"]
        and out.shape[1] == short.shape[1] == inputs["input_ids"].shape[1] + 1
    )

    model.generation_config.max_new_tokens = None  # control: the folder as it was before
    with pytest.warns(UserWarning, match="model-agnostic default `max_length`"):
        model.generate(**inputs)


def test_bare_generate_writes_one_trained_window(tmp_path):
    """A checkpoint trained on 16 tokens: a bare generate writes 16 new tokens, not transformers' 20."""
    from transformers import AutoTokenizer, PersimmonForCausalLM

    source = write_release_folder(build_release(seed=0, seq_length=16), tmp_path / "short_release")
    persimmon_tools.convert(source, tmp_path / "hf", verify="off")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = PersimmonForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    inputs = tok("hello", return_tensors="pt")
    with warnings_as_errors() as logs:
        out = model.generate(**inputs, eos_token_id=None)  # random weights: never stop early
    assert out.shape[1] == inputs["input_ids"].shape[1] + 16
    assert not [r for r in logs.records if "max_length" in r.getMessage()]
