"""A converted folder works for batched generation and chat out of the box (issue 16, item 1).

Everything runs with Python warnings as errors and fails on any WARNING from the ``transformers`` logger:
a missing pad token, right padding in ``generate`` or a pipeline that refuses to batch all show there.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

PROMPTS = ["human: hi", "the quick brown fox jumps over the lazy dog and"]
CHATS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "tell me a long story now"}]]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    from persimmon_tools.conversion.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("generation_ready") / "tiny-chat-hf"
    convert(
        Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar", out, ConvertOptions(chat=True)
    )
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def no_warnings():
    """Warnings are errors; WARNING records of the ``transformers`` logger fail the test."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


@pytest.fixture(scope="module")
def loaded(chat_folder):
    from transformers import AutoTokenizer, PersimmonForCausalLM

    tok = AutoTokenizer.from_pretrained(chat_folder)
    model = PersimmonForCausalLM.from_pretrained(chat_folder, dtype=torch.float32).eval()
    return tok, model


def test_pad_token_side_bos_and_max_length(chat_folder, loaded):
    tok, model = loaded
    config = json.loads((chat_folder / "config.json").read_text())
    gen = json.loads((chat_folder / "generation_config.json").read_text())
    assert tok.pad_token == "|ENDOFTEXT|" == tok.bos_token
    assert tok.pad_token_id == config["pad_token_id"] == gen["pad_token_id"] == config["eos_token_id"]
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "left"
    assert tok.add_bos_token is True
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    assert tok.model_max_length == config["max_position_embeddings"] == 2048


def test_batched_generate_equals_unbatched(loaded):
    tok, model = loaded
    with no_warnings():
        single = []
        for p in PROMPTS:
            enc = tok(p, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            single.append(out[0, enc["input_ids"].shape[1] :].tolist())
        enc = tok(PROMPTS, padding=True, return_tensors="pt")
        assert enc["attention_mask"][0, 0] == 0  # unequal lengths, padded on the left
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    batched = out[:, enc["input_ids"].shape[1] :].tolist()
    assert batched == single


def test_pipeline_batches_plain_prompts_and_chats(loaded):
    from transformers import pipeline

    tok, model = loaded
    with no_warnings():
        pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
        one = [pipe(p, max_new_tokens=4, do_sample=False)[0]["generated_text"] for p in PROMPTS]
        two = [r[0]["generated_text"] for r in pipe(PROMPTS, batch_size=2, max_new_tokens=4, do_sample=False)]
        chats = pipe(CHATS, batch_size=2, max_new_tokens=4, do_sample=False)
    assert one == two
    assert [len(c[0]["generated_text"]) for c in chats] == [2, 2]  # the user turn and the model's answer


def test_recommended_chat_call_has_exactly_one_bos(loaded):
    """``tok(apply_chat_template(..., tokenize=False))`` (docs/tokenizer.md) equals the plain prompt's ids."""
    tok, _ = loaded
    text = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert text == "human: hi\n\nadept:"
    ids = tok(text)["input_ids"]
    assert ids == tok("human: hi\n\nadept:")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.xfail(
    strict=True,
    reason="apply_chat_template(tokenize=True) encodes with add_special_tokens=False, and with "
    "split_special_tokens=True a bos_token rendered by the template would be text, not the BOS id",
)
def test_chat_template_tokenize_true_agrees_with_plain_prompt_on_bos(loaded):
    tok, _ = loaded
    ids = tok.apply_chat_template(CHATS[0], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == tok("human: hi\n\nadept:")["input_ids"]
