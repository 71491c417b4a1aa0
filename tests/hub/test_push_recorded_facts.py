"""push uses what the folder records before asking (``convert --chat`` decides the licence, and the card says
so), and says "no token" when there is none instead of blaming the Hub or the credentials (issue 23, part G).

The tiny release's own name says neither base nor chat, so only the recorded ``--chat`` can tell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_fixtures import TOKEN
from hub_server import HubServer
from huggingface_hub import ModelCard

from persimmon_tools.cli import main
from persimmon_tools.hub.variant import variant_evidence

# huggingface_hub passes file objects as `data=` to its HTTP client, which warns about it (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "alice/persimmon-tiny"
FIXTURE_TAR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_release.tar"


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled tiny release converted once with --chat (verified by convert) and once without."""
    root = tmp_path_factory.mktemp("recorded_facts")
    chat, plain = root / "chat-hf", root / "plain-hf"
    done = cli("convert", FIXTURE_TAR, chat, "--chat")
    assert done.exit_code == 0, done.stderr
    done = cli("convert", FIXTURE_TAR, plain, "--no-verify")
    assert done.exit_code == 0, done.stderr
    return {"chat": chat, "plain": plain}


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No --token, no HF_TOKEN, no stored login (huggingface_hub reads the token file named at import)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


# ---- 1. the recorded --chat decides the licence ------------------------------------------------------------


def test_convert_chat_is_evidence_for_the_licence_and_the_card_says_so(hub: HubServer, tiny) -> None:
    record = json.loads((tiny["chat"] / "conversion.json").read_text())["source"]
    assert record["variant"] == "unknown" and "names base or chat" in record["variant_from"]
    result = cli("push", tiny["chat"], REPO, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "license: cc-by-nc-4.0" in result.stdout and "base_model: adept/persimmon-8b-chat" in result.stdout
    assert "Variant: **chat**, from the --chat choice recorded in conversion.json" in result.stdout
    assert "Commit:     Upload Persimmon-8B chat" in result.stdout
    pushed = cli("push", tiny["chat"], REPO)
    assert pushed.exit_code == 0, pushed.stderr
    card = ModelCard(hub.file(REPO, "README.md").decode())
    assert card.data.license == "cc-by-nc-4.0" and "chat" in card.data.tags
    assert "Variant: **chat**, from the --chat choice recorded in conversion.json" in card.text


def test_without_any_recorded_fact_the_refusal_says_what_was_looked_at(hub: HubServer, tiny) -> None:
    result = cli("push", tiny["plain"], REPO, "--dry-run", "--allow-unverified")
    assert result.exit_code == 2, result.stderr
    assert "licence is unknown" in result.stderr and "names base or chat" in result.stderr
    assert "no chat template" in result.stderr and "Hint: pass --license" in result.stderr
    given = cli("push", tiny["plain"], REPO, "--dry-run", "--allow-unverified", "--license", "apache-2.0")
    assert given.exit_code == 0, given.stderr
    assert "Variant: unknown (" in given.stdout and "licence `apache-2.0`, set with --license" in given.stdout


def test_every_recorded_fact_counts_and_disagreeing_facts_decide_nothing() -> None:
    named = {"source": {"variant": "base", "variant_from": "tarball name 8b_base_model_release.tar"}}
    unknown = {"source": {"variant": "unknown", "variant_from": "unknown: conflicting names"}}
    template = {"chat_template": "{{ 'human: ' + m }}{{ 'adept:' }}"}
    assert variant_evidence(named, None).variant == "base"
    assert "8b_base_model_release.tar" in variant_evidence(named, None).origin
    # the --chat choice, recorded in conversion.json or as ADEPT's chat template, beats an undecided name
    assert variant_evidence({**unknown, "chat": True}, None).variant == "chat"
    assert variant_evidence({**unknown, "tokenizer": {"chat": True}}, None).variant == "chat"
    assert variant_evidence(unknown, None, template).variant == "chat"
    assert variant_evidence(unknown, None, {"chat_template": "{{ messages }}"}).variant == "unknown"
    assert variant_evidence({**unknown, "chat": False}, None).variant == "unknown"  # --no-chat says nothing
    # older records: the release file's own name
    assert variant_evidence(None, {"source": {"path": "/x/8b_chat_model_release.tar"}}).variant == "chat"
    clash = variant_evidence(named, None, template)
    assert clash.variant == "unknown" and clash.conflicting
    assert "says base" in clash.origin and "says chat" in clash.origin


# ---- 2. no token is said as such -----------------------------------------------------------------------------


def test_dry_run_says_a_real_push_needs_a_token(hub: HubServer, tiny, no_token) -> None:
    result = cli("push", tiny["chat"], REPO, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "Token:      none found: a real push would need one" in result.stdout
    assert "hf auth login" in result.stdout and "HF_TOKEN" in result.stdout and "--token" in result.stdout
    given = cli("push", tiny["chat"], REPO, "--dry-run", "--token", TOKEN, "--json")
    assert given.exit_code == 0, given.stderr
    assert json.loads(given.stdout)["plan"]["token"] == "from --token" and TOKEN not in given.stdout


def test_dry_run_names_where_the_token_comes_from(hub: HubServer, tiny) -> None:
    result = cli("push", tiny["chat"], REPO, "--dry-run")
    assert result.exit_code == 0 and "Token:      from HF_TOKEN" in result.stdout
    assert TOKEN not in result.stdout


def test_a_401_without_a_token_says_none_was_sent(hub: HubServer, tiny, no_token) -> None:
    result = cli("push", tiny["chat"], REPO)
    assert result.exit_code == 1
    assert "No Hub token found" in result.stderr  # said before anything was sent
    assert "401" in result.stderr and "no Hub token was sent" in result.stderr
    assert "refused the" not in result.stderr
    hint = result.stderr.split("Hint:", 1)[1]
    assert (
        "hf auth login" in hint
        and "huggingface-cli login" in hint
        and "HF_TOKEN" in hint
        and "--token" in hint
    )
    assert hub.repos == {}


def test_a_wrong_token_is_still_refused_credentials(hub: HubServer, tiny) -> None:
    result = cli("push", tiny["chat"], REPO, "--token", "hf_nope")
    assert result.exit_code == 1 and "the Hub refused the token from --token" in result.stderr


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_no_token_for_huggingface_co_is_refused_before_any_request(
    hub: HubServer, tiny, no_token, monkeypatch: pytest.MonkeyPatch, offline: bool, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    folder = tmp_path / "hf"
    shutil.copytree(tiny["chat"], folder)
    result = cli("push", folder, REPO, "--endpoint", "https://huggingface.co")
    assert result.exit_code == 1, result.stderr
    assert "cannot push to https://huggingface.co: no Hub token was found" in result.stderr
    assert ("HF_HUB_OFFLINE is set as well" in result.stderr) == offline
    assert "Hint: log in with `hf auth login`" in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.output + result.stderr and hub.requests == []
