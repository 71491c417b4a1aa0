"""Re-load written tokenizer files the way their users will, before they are accepted.

``tokenizer.json`` is serialized by ``tokenizers`` itself, yet a value it cannot read back (a NaN score
becomes JSON ``null``) or a config ``transformers`` rejects would only show when someone loads the folder.
:func:`check_reload` therefore loads the staged files with ``tokenizers.Tokenizer.from_file`` or, when
``transformers`` is installed (it is optional), with ``AutoTokenizer.from_pretrained`` on a folder that
holds exactly those files (its fast backend is ``Tokenizer.from_file`` of the same file), and requires the
result to encode the sample like the tokenizer that was written.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from persimmon_tools.errors import TokenizerError

log = logging.getLogger(__name__)

_HINT = (
    "nothing was written; this is a bug in persimmon-tools or an incompatibility with the installed "
    "{lib} ({version}): please report it together with the model file"
)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return f"{module} {version(module)}"
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return module


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:500]


def check_reload(folder: Path, tok, texts: list[str], *, origin: str) -> None:
    """Load ``folder``'s tokenizer files back and compare their encodings of ``texts`` with ``tok``'s.

    Without ``transformers``: ``tokenizers.Tokenizer.from_file(tokenizer.json)``. With it:
    ``AutoTokenizer.from_pretrained(folder)``, whose fast backend *is* ``Tokenizer.from_file`` of the same
    ``tokenizer.json`` (``PreTrainedTokenizerFast`` / ``TokenizersBackend``); both its backend and the
    ``transformers`` object must encode like ``tok``. The ``transformers`` object is called with
    ``split_special_tokens=True``, the call that encodes like SentencePiece whatever the text (the written
    config keeps transformers' default, false, under which literal special-token text such as
    ``|ENDOFTEXT|`` is that token), and also with its defaults on the texts that contain no special-token
    text, where both calls must agree with ``tok``. Loading the file a second time on its own would double
    the cost (loading and freeing a large vocabulary's copy; see docs/performance.md) without testing
    anything more; it is done only to say which layer failed when ``AutoTokenizer`` fails, or when it
    returned a tokenizer without a fast backend.

    Args:
        folder: holds ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
            ``tokenizer.model`` and nothing else (``AutoTokenizer`` would also read a ``config.json``).
        tok: the ``tokenizers.Tokenizer`` that was serialized (post-processor included).
        texts: a few texts to encode with both (the built-in sample: 40 texts).
        origin: the SentencePiece model's path, for messages.

    Raises:
        TokenizerError: with what the loader said, or the first text the loaded tokenizer encodes differently.
    """
    start = time.perf_counter()
    folder = Path(folder)
    expected = [e.ids for e in tok.encode_batch(texts)]
    if not _have_transformers():
        log.debug("transformers is not installed; tokenizer.json re-loaded with tokenizers only")
        backend = _from_file(folder, origin)
    else:
        try:
            auto = _load_auto(folder)
        except Exception as err:  # transformers raises OSError, ValueError, TypeError, ...
            _from_file(folder, origin)  # a tokenizer.json that tokenizers itself rejects is reported as such
            raise TokenizerError(
                f"the tokenizer files written for {origin} do not load with transformers.AutoTokenizer: "
                f"{type(err).__name__}: {_first_line(err)}",
                hint=_HINT.format(lib="transformers", version=_version("transformers")),
            ) from err
        got = [list(ids) for ids in auto(texts, split_special_tokens=True)["input_ids"]]
        _compare(expected, got, texts, "transformers.AutoTokenizer", "transformers", origin)
        specials = [s for s in getattr(auto, "all_special_tokens", []) if s]
        plain = [i for i, text in enumerate(texts) if not any(s in text for s in specials)]
        if plain:  # what a plain tok(text) gives, on the texts where it must equal SentencePiece's ids
            got = [list(ids) for ids in auto([texts[i] for i in plain])["input_ids"]]
            _compare(
                [expected[i] for i in plain],
                got,
                [texts[i] for i in plain],
                "transformers.AutoTokenizer (default call)",
                "transformers",
                origin,
            )
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer: tokenizer.json was not read at all
            backend = _from_file(folder, origin)
        else:  # transformers added its special tokens to it; as text, like tokenizer.json on its own
            backend.encode_special_tokens = True
    got = [e.ids for e in backend.encode_batch(texts)]
    _compare(expected, got, texts, "tokenizers.Tokenizer.from_file", "tokenizers", origin)
    log.debug("tokenizer files re-loaded in %.2f s", time.perf_counter() - start)


def _have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _from_file(folder: Path, origin: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as err:  # tokenizers raises a bare Exception with serde's message
        raise TokenizerError(
            f"the tokenizer.json written for {origin} does not load back with tokenizers.Tokenizer.from_file: "
            f"{_first_line(err)}",
            hint=_HINT.format(lib="tokenizers", version=_version("tokenizers")),
        ) from err


def _load_auto(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def _compare(expected: list, got: list, texts: list[str], loader: str, lib: str, origin: str) -> None:
    for text, a, b in zip(texts, expected, got, strict=True):
        if a != b:
            raise TokenizerError(
                f"the tokenizer files written for {origin} load with {loader} but encode {text!r} as "
                f"{b[:12]}, the written tokenizer as {a[:12]}",
                hint=_HINT.format(lib=lib, version=_version(lib)),
            )
