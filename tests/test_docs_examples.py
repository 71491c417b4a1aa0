"""The examples in README.md and docs/*.md that are marked runnable run as written, on the bundled fixture.

A fenced ```bash / ```sh / ```python block directly below a line ``<!-- runnable -->`` (or
``<!-- runnable: needs=transformers -->``) is an example a reader can paste into a shell (or a Python file)
at the checkout's root. Each document's runnable blocks run in order in one fresh scratch folder that holds a
link ``fixtures`` to the checkout's ``fixtures/`` (so later blocks see what earlier ones wrote): shell blocks
with ``bash -euo pipefail``, Python blocks with this interpreter and ``-W error``. HOME and TMPDIR point into
the scratch folder, the Hub is offline and the proxies lead nowhere, so no block reaches the network. The
documents are independent of each other: they run as jobs of the session's ``background`` (tests/conftest.py),
started when the session begins, beside the tests that come first.

A block below ``<!-- not-runnable: REASON -->`` is skipped on purpose; in the documents of ``CHOOSING`` every
bash/sh/python block must carry one of the two marks, so a new example has to choose.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from forkserver_clients import cli_path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]
# Documents in which every bash/sh/python block must be marked runnable or not-runnable.
CHOOSING = ["README.md", "docs/user-guide.md", "docs/tokenizer.md", "docs/verify.md"]
SHELLS = {"bash", "sh", "shell", "console"}
LANGS = SHELLS | {"python", "py"}
KNOWN_NEEDS = {"transformers"}
# Lower bounds, so that deleting markers cannot make the check pass with nothing to run.
MIN_RUNNABLE = {"README.md": 1, "docs/user-guide.md": 2, "docs/tokenizer.md": 2, "docs/verify.md": 1}
MIN_RUNNABLE_TOTAL = 7
BLOCK_TIMEOUT_S = 300

MARK = re.compile(r"^\s*<!--\s*(runnable|not-runnable)\s*(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: str | None  # "runnable", "not-runnable" or None
    note: str  # the text after "runnable:" / "not-runnable:"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def needs(self) -> set[str]:
        return {n for m in re.finditer(r"needs=([\w,-]+)", self.note) for n in m.group(1).split(",") if n}


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file (plain fences too, lang ""), with the mark on the line above."""
    lines = path.read_text().splitlines()
    doc = path.relative_to(REPO).as_posix()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        mark = MARK.match(lines[i - 1]) if i else None
        body = textwrap.dedent(
            "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end])
        )
        found.append(
            Block(
                doc=doc,
                line=i + 1,
                lang=lang.lower(),
                code=body + "\n",
                mark=mark.group(1) if mark else None,
                note=(mark.group(2) or "") if mark else "",
            )
        )
        i = end + 1
    return found


ALL_BLOCKS = [b for path in DOCS for b in blocks_of(path)]
RUNNABLE_DOCS = sorted({b.doc for b in ALL_BLOCKS if b.mark == "runnable"})


def _env(scratch: Path, environ: dict[str, str], path: str) -> dict[str, str]:
    """The examples' environment; ``path`` finds ``persimmon-tools`` first (tests/cli_forkserver.py). One
    home folder for every document (the examples only read it), so that their commands and Python blocks
    share one import environment: the fork server's warm child for it has loaded transformers once."""
    home, tmp = scratch.parent / "docs-home", scratch / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir()
    env = {k: v for k, v in environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "PERSIMMON"))}
    env.update(
        PATH=path,
        HOME=str(home),
        TMPDIR=str(tmp),
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        # Anything that still tries the network fails at once.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        NO_PROXY="",
        no_proxy="",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def _command(block: Block, script: Path, python: str) -> list[str]:
    if block.lang in SHELLS:
        return ["bash", "-euo", "pipefail", str(script)]
    return [python, "-W", "error", str(script)]


def _missing_needs(doc: str) -> list[str]:
    blocks = [b for b in ALL_BLOCKS if b.doc == doc and b.mark == "runnable"]
    return sorted({n for b in blocks for n in b.needs if importlib.util.find_spec(n) is None})


def _run_doc(background, doc: str, scratch: Path) -> str | None:
    """Run ``doc``'s runnable blocks in order in ``scratch`` (a ``background`` job, see tests/conftest.py);
    None when every block exited 0, else what went wrong."""
    blocks = [b for b in ALL_BLOCKS if b.doc == doc and b.mark == "runnable"]
    work, scripts = scratch / "work", scratch / "scripts"
    work.mkdir()
    scripts.mkdir()
    (work / "fixtures").symlink_to(REPO / "fixtures", target_is_directory=True)
    env = _env(scratch, background.environ, cli_path(background, scratch.parent))
    python = background.python()
    fixtures_before = _listing(REPO / "fixtures")
    for block in blocks:
        if block.lang not in LANGS:
            return f"{block.where}: a runnable block must be bash, sh or python, not {block.lang!r}"
        unknown = block.needs - KNOWN_NEEDS
        if unknown:
            return f"{block.where}: unknown needs= {sorted(unknown)} (known: {sorted(KNOWN_NEEDS)})"
        suffix = ".sh" if block.lang in SHELLS else ".py"
        script = scripts / f"line{block.line}{suffix}"
        script.write_text(block.code)
        try:
            done = background.run(_command(block, script, python), cwd=work, env=env, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"{block.where}: the {block.lang} example ran past {BLOCK_TIMEOUT_S} s"
        if done.returncode != 0:
            return (
                f"{block.where}: the {block.lang} example exited {done.returncode}\n"
                f"--- example ---\n{block.code}--- stdout (tail) ---\n{done.stdout[-3000:]}\n"
                f"--- stderr (tail) ---\n{done.stderr[-3000:]}"
            )
        if _listing(REPO / "fixtures") != fixtures_before:  # wrote through the link into the checkout
            return f"{block.where}: the example changed the checkout's fixtures/ (work in a scratch folder)"
    return None


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every entry under ``folder`` with its size and modification time (ns)."""
    return sorted(
        (str(p.relative_to(folder)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")
    )


def _key(doc: str) -> str:
    return f"{__name__}: {doc}"


def _start(background, tmp_path_factory, docs: list[str]) -> None:
    runnable = [d for d in docs if not _missing_needs(d) and _key(d) not in background.started]
    runnable.sort(key=lambda d: -sum(1 for b in ALL_BLOCKS if b.doc == d and b.mark == "runnable"))
    for doc in runnable:  # most blocks first
        scratch = tmp_path_factory.mktemp(re.sub(r"\W", "_", doc))
        background.started[_key(doc)] = background.submit(_run_doc, doc, scratch)


def start_in_background(background, tmp_path_factory, items) -> None:
    """Called by tests/conftest.py's ``background`` when the session begins: the selected documents' examples
    (about a minute in bash and python children) run beside the tests that come before this module's."""
    docs = {
        item.callspec.params["doc"]
        for item in items
        if item.originalname == "test_runnable_examples_run_as_written"
    }
    _start(background, tmp_path_factory, sorted(docs))


@pytest.fixture(scope="module")
def doc_runs(background, tmp_path_factory):
    """``background`` with every document's run started; as pytest's own process now waits for them, as many
    documents run at a time as there are cores (at least two)."""
    _start(background, tmp_path_factory, RUNNABLE_DOCS)  # those not started with the session
    return background.add_workers(max(2, os.cpu_count() or 1))


@pytest.mark.parametrize("doc", RUNNABLE_DOCS)
def test_runnable_examples_run_as_written(doc, doc_runs):
    missing = _missing_needs(doc)
    if missing:
        pytest.skip(f"{doc}: runnable examples need {', '.join(missing)}, which is not installed")
    failure = doc_runs.started[_key(doc)].result()
    assert failure is None, failure


def test_markers_are_used():
    counts = {
        doc: sum(1 for b in ALL_BLOCKS if b.doc == doc and b.mark == "runnable") for doc in MIN_RUNNABLE
    }
    short = {doc: n for doc, n in counts.items() if n < MIN_RUNNABLE[doc]}
    assert not short, f"fewer runnable examples than expected: {short} (minimum {MIN_RUNNABLE})"
    total = sum(1 for b in ALL_BLOCKS if b.mark == "runnable")
    assert total >= MIN_RUNNABLE_TOTAL, f"only {total} runnable examples in README.md and docs/"


def test_every_example_chooses_runnable_or_says_why_not():
    for doc in CHOOSING:
        assert (REPO / doc).exists(), doc
    unmarked = [b.where for b in ALL_BLOCKS if b.doc in CHOOSING and b.lang in LANGS and b.mark is None]
    assert not unmarked, (
        "mark each example with <!-- runnable --> (it then runs in tests/test_docs_examples.py) or "
        f"<!-- not-runnable: REASON --> on the line directly above its fence: {unmarked}"
    )
    no_reason = [b.where for b in ALL_BLOCKS if b.mark == "not-runnable" and not b.note.strip()]
    assert not no_reason, f"<!-- not-runnable: REASON --> needs a reason: {no_reason}"
    misplaced = [b.where for b in ALL_BLOCKS if b.mark == "runnable" and b.lang not in LANGS]
    assert not misplaced, f"<!-- runnable --> above a block that is not bash, sh or python: {misplaced}"


def _code_without_comments(block: Block) -> str:
    return "\n".join(line.split("#", 1)[0] for line in block.code.splitlines())


def test_python_examples_use_dtype_not_torch_dtype():
    """transformers 5 deprecates from_pretrained(torch_dtype=...) (a logged warning, which -W error misses)."""
    old = [
        b.where
        for b in ALL_BLOCKS
        if b.lang in {"python", "py"} and re.search(r"\btorch_dtype\s*=", _code_without_comments(b))
    ]
    assert not old, f"use dtype= (transformers 5), not torch_dtype=: {old}"


def test_shell_examples_do_not_put_backslash_n_in_double_quotes():
    r"""In bash "a\nb" is a backslash and an n; a newline is $'a\nb'."""
    bad = [
        b.where
        for b in ALL_BLOCKS
        if b.lang in SHELLS and re.search(r'(?<![$\\])"[^"\n]*\\n[^"\n]*"', _code_without_comments(b))
    ]
    assert not bad, f"\"...\\n...\" passes a literal backslash-n in bash; use $'...\\n...': {bad}"


def test_the_parser_sees_indented_and_marked_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n\n<!-- runnable: needs=transformers -->\n```python\nprint(1)\n```\n\n"
        "- item\n\n  <!-- not-runnable: a fragment -->\n  ```bash\n  echo hi\n    more\n  ```\n\n```\nplain\n```\n"
    )
    first, second, third = blocks_of(doc)
    assert (first.line, first.lang, first.mark, first.needs, first.code) == (
        4,
        "python",
        "runnable",
        {"transformers"},
        "print(1)\n",
    )
    assert (second.line, second.lang, second.mark, second.note, second.code) == (
        11,
        "bash",
        "not-runnable",
        "a fragment",
        "echo hi\n  more\n",
    )
    assert (third.lang, third.mark) == ("", None)
