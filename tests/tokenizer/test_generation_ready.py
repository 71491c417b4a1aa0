"""A converted folder works for batched generation and chat out of the box (issue 16, item 1).

Everything runs with Python warnings as errors and fails on any WARNING from the ``transformers`` logger:
a missing pad token, right padding in ``generate`` or a pipeline that refuses to batch all show there.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformers_warnings import warnings_as_errors

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


@contextmanager
def no_warnings():
    """Warnings are errors; WARNING records of the ``transformers`` logger fail the test."""
    with warnings_as_errors() as logs:
        yield
    assert not logs.records, [r.getMessage() for r in logs.records]


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


PLAIN = "human: hi\n\nadept:"  # CHATS[0] as a plain prompt


def test_recommended_chat_call_has_exactly_one_bos(loaded):
    """``apply_chat_template(..., tokenize=True, return_dict=True)`` (docs/tokenizer.md) equals the plain
    prompt's ids; the rendered text starts with the BOS text, so ``tok(text)`` would add a second BOS."""
    tok, _ = loaded
    with no_warnings():
        enc = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=True, return_dict=True)
    plain = tok(PLAIN)["input_ids"]
    assert enc["input_ids"] == plain
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
    text = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert text == tok.bos_token + PLAIN
    assert tok(text, add_special_tokens=False)["input_ids"] == plain
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 2  # the mistake the docs warn about


def test_chat_template_tokenize_true_agrees_with_plain_prompt_on_bos(loaded):
    from transformers import pipeline

    tok, model = loaded
    plain = tok(PLAIN)["input_ids"]
    with no_warnings():
        ids = tok.apply_chat_template(CHATS[0], tokenize=True, add_generation_prompt=True)
        pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
        out = pipe(CHATS[0], max_new_tokens=2, do_sample=False, return_tensors=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5.23 returns a BatchEncoding
    assert ids == plain
    assert list(out[0]["generated_token_ids"][: len(plain)]) == plain  # what pipeline(messages) encoded
    multi = [*CHATS[0], {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    enc = tok.apply_chat_template(multi, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert enc["input_ids"] == tok(PLAIN + " hello\n\nhuman: more\n\nadept:")["input_ids"]
    assert enc["input_ids"].count(tok.bos_token_id) == 1


def test_literal_endoftext_in_chat_content(chat_folder, loaded):
    """``|ENDOFTEXT|`` is a user-defined piece of ADEPT's vocabulary: SentencePiece itself encodes the literal
    text as that id, so ``sanitize_control_tokens=True`` refuses it; ``bos_token=""`` and
    ``split_special_tokens=True`` encode the content exactly as SentencePiece does (docs/tokenizer.md)."""
    import sentencepiece as spm

    tok, _ = loaded
    sp = spm.SentencePieceProcessor(model_file=str(chat_folder / "tokenizer.model"))
    clean = tok.apply_chat_template(
        CHATS[0], tokenize=True, add_generation_prompt=True, return_dict=True, sanitize_control_tokens=True
    )
    assert clean["input_ids"] == tok(PLAIN)["input_ids"]
    messages = [{"role": "user", "content": "a |ENDOFTEXT| b"}]
    with pytest.raises(ValueError, match="produces it from plain text"):
        tok.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            sanitize_control_tokens=True,
        )
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, bos_token="")
    assert text == "human: a |ENDOFTEXT| b\n\nadept:"
    assert tok(text, split_special_tokens=True)["input_ids"] == [tok.bos_token_id, *sp.encode(text)]
    assert tok(text)["input_ids"] != [tok.bos_token_id, *sp.encode(text)]  # the default drops a "▁"
