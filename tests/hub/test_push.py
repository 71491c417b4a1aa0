"""``push_folder`` against the local Hub server, driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hub_server import HubServer
from huggingface_hub import ModelCard

from persimmon_tools.errors import HubError, UsageError
from persimmon_tools.hub.push import PushOptions, check_verification, push_folder

# huggingface_hub passes file objects as `data=` to its HTTP client, which warns about it (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "alice/persimmon-8b-chat"
WRITE_ROUTES = {
    "create_repo",
    "branch",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "lfs_part",
    "commit",
    "lfs_verify",
}


def push(folder: Path, hub: HubServer, repo: str = REPO, **kwargs):
    kwargs.setdefault("retry_base_delay", 0.001)
    return push_folder(folder, repo, PushOptions(endpoint=hub.url, **kwargs))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def new_commits(hub: HubServer, repo: str = REPO):
    return [c for c in hub.commits_of(repo) if c.parent is not None]


# ---- the main path -------------------------------------------------------------------------------------------


def test_push_uploads_every_file_intact_in_one_commit(hub: HubServer, converted) -> None:
    folder = converted()
    result = push(folder, hub)

    [commit] = new_commits(hub)
    expected = set(local_files(folder)) | {"README.md"}
    assert set(commit.changed) == expected
    assert commit.ref == "main" and commit.pr_num is None
    assert hub.repos[REPO].branches["main"] == commit.oid
    for path, data in local_files(folder).items():
        assert sha(hub.file(REPO, path)) == sha(data), path
    assert commit.message.startswith("Upload Persimmon-8B chat converted by persimmon-tools")
    assert "Verification: pass" in commit.description
    assert result.commit_url == f"{hub.url}/{REPO}/commit/{commit.oid}"
    assert result.pr_url is None
    assert set(result.uploaded) == expected and result.skipped == ()
    # big binary files went through LFS, small JSON inline
    tree = hub.repos[REPO].commits[commit.oid].tree
    assert tree["model-00001-of-00002.safetensors"].lfs_oid is not None
    assert tree["tokenizer.model"].lfs_oid is not None
    assert tree["config.json"].lfs_oid is None
    assert sorted(hub.lfs_puts) == sorted(
        {sha(d) for p, d in local_files(folder).items() if p.endswith((".safetensors", ".model"))}
    )
    assert hub.repos[REPO].private is False


def test_commit_message_private_and_endpoint_from_env(hub: HubServer, converted) -> None:
    folder = converted()
    # no endpoint argument: HF_ENDPOINT (set by the fixture) must be honoured
    result = push_folder(
        folder, REPO, PushOptions(private=True, commit_message="my message", retry_base_delay=0.001)
    )
    [commit] = new_commits(hub)
    assert commit.message == "my message"
    assert hub.repos[REPO].private is True
    assert result.repo_url == f"{hub.url}/{REPO}"


def test_multipart_lfs_upload_arrives_intact(hub: HubServer, converted) -> None:
    folder = converted()
    hub.multipart_chunk_size = 1000  # every LFS file here is larger: uses the multipart protocol
    push(folder, hub)
    assert hub.count("lfs_part") > 2 and hub.count("lfs_upload") == 0
    for path, data in local_files(folder).items():
        assert hub.file(REPO, path) == data


# ---- model card --------------------------------------------------------------------------------------------


def _card(hub: HubServer, repo: str = REPO, rev: str = "main") -> ModelCard:
    return ModelCard(hub.file(repo, "README.md", rev).decode())


def test_card_metadata_and_body_chat(hub: HubServer, converted) -> None:
    result = push(converted(variant="chat"), hub)
    card = _card(hub)
    assert result.card == str(card)
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.base_model == "adept/persimmon-8b-chat"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers"
    assert {"persimmon", "chat"} <= set(card.data.tags)
    assert "unverified" not in card.data.tags
    text = card.text
    assert "human: {prompt}\n\nadept:" in text  # chat prompt format
    assert "8b_chat_model_release.tar" in text and "| Iteration | 1251 |" in text
    assert "| Tensor parallel (TP) | 1 |" in text and "bfloat16" in text
    assert "sha256:" in text and "persimmon-tools 0.1.0" in text
    assert "Rotary precision" in text and "float16" in text
    assert "human: Hello \\| there⏎⏎adept:" in text  # metrics table row, escaped
    assert "0.0123" in text and "Verdict: **pass**" in text
    assert f'from_pretrained("{REPO}"' in text


def test_card_base_variant_and_license_override(hub: HubServer, converted) -> None:
    push(converted("base", variant="base"), hub, "alice/base")
    card = _card(hub, "alice/base")
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "adept/persimmon-8b-base"
    assert "human: {prompt}" not in card.text and "chat" not in card.data.tags
    push(converted("other", variant="chat"), hub, "alice/other", license="other")
    assert _card(hub, "alice/other").data.license == "other"


def test_user_readme_is_kept_unless_card_replace(hub: HubServer, converted) -> None:
    folder = converted(readme="---\nlicense: mit\n---\n# My own card\n")
    push(folder, hub)
    assert hub.file(REPO, "README.md") == b"---\nlicense: mit\n---\n# My own card\n"
    result = push(folder, hub, card="replace")
    assert _card(hub).data.license == "cc-by-nc-4.0"
    assert result.uploaded == ("README.md",)
    assert (folder / "README.md").read_text().endswith("# My own card\n")  # the folder is not modified


def test_unknown_variant_needs_a_license(hub: HubServer, converted) -> None:
    folder = converted(variant="unknown")
    with pytest.raises(UsageError, match="licence is unknown") as err:
        push(folder, hub)
    assert "--license" in (err.value.hint or "")
    assert hub.requests == []
    push(folder, hub, license="apache-2.0")
    assert _card(hub).data.license == "apache-2.0"


# ---- refusing what was not verified ------------------------------------------------------------------------


def _reverify(folder: Path, **kwargs) -> None:
    from hub_fixtures import write_verification

    write_verification(folder, **kwargs)


def _tamper_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "spoil, why",
    [
        (lambda f: (f / "verification.json").unlink(), "verification.json is missing"),
        (lambda f: _reverify(f, verdict="fail"), "verdict 'fail'"),
        (lambda f: _reverify(f, files={}), "records no file fingerprints"),
        (lambda f: _tamper_same_size(f / "model-00002-of-00002.safetensors"), "sha256 differs"),
        (lambda f: (f / "extra.bin").write_bytes(b"x"), "extra.bin: present but not recorded"),
        (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: recorded but missing"),
    ],
    ids=["missing", "failed", "no-files", "tampered", "added", "removed"],
)
def test_refuses_unverified_or_tampered_folders(hub: HubServer, converted, spoil, why) -> None:
    folder = converted()
    spoil(folder)
    with pytest.raises(HubError, match="refusing to publish") as err:
        push(folder, hub)
    assert why in err.value.message
    assert "--allow-unverified" in (err.value.hint or "")
    assert hub.requests == []  # refused before touching the Hub


def test_allow_unverified_publishes_and_says_so(hub: HubServer, converted) -> None:
    folder = converted()
    _tamper_same_size(folder / "model-00001-of-00002.safetensors")
    result = push(folder, hub, allow_unverified=True)
    card = _card(hub)
    assert "unverified" in card.data.tags
    assert "**Unverified.**" in card.text and "sha256 differs" in card.text
    assert result.plan.verified is False
    [commit] = new_commits(hub)
    assert commit.message.endswith("(unverified)")
    for path, data in local_files(folder).items():  # what is published is the folder as it is now
        assert hub.file(REPO, path) == data


def test_check_verification_accepts_a_fresh_report(converted) -> None:
    problems, files = check_verification(converted())
    assert problems == [] and files and "config.json" in files


# ---- dry run -----------------------------------------------------------------------------------------------


def test_dry_run_uploads_nothing(hub: HubServer, converted) -> None:
    folder = converted()
    result = push(folder, hub, dry_run=True)
    assert result.dry_run and result.commit_url is None
    assert not {r for _, _, r in hub.requests} & WRITE_ROUTES
    assert hub.repos == {}
    plan = result.plan
    assert plan.repo_exists is False and plan.revision == "main"
    by_path = {f.path: f for f in plan.files}
    assert set(by_path) == set(local_files(folder)) | {"README.md"}
    assert by_path["model-00001-of-00002.safetensors"].lfs and not by_path["config.json"].lfs
    sizes = {p: len(d) for p, d in local_files(folder).items()}
    assert all(by_path[p].size == n for p, n in sizes.items())
    assert not any(f.remote_identical for f in plan.files)
    assert plan.card.startswith("---\n") and "license: cc-by-nc-4.0" in plan.card


def test_dry_run_reports_what_the_remote_already_has(hub: HubServer, converted) -> None:
    folder = converted()
    push(folder, hub)
    (folder / "config.json").write_text('{"model_type": "persimmon", "changed": true}\n')
    converted.reverify(folder)
    before = len(hub.requests)
    plan = push(folder, hub, dry_run=True).plan
    assert not {r for _, _, r in hub.requests[before:]} & WRITE_ROUTES
    assert plan.repo_exists is True
    changed = {f.path for f in plan.to_upload}
    assert changed == {"config.json", "verification.json", "README.md"}  # README: the fingerprint changed
    assert {f.path for f in plan.skipped} == set(local_files(folder)) - changed
    assert len(new_commits(hub)) == 1


# ---- re-runs and interruptions -----------------------------------------------------------------------------


def test_rerun_of_a_finished_push_sends_nothing_and_makes_no_commit(hub: HubServer, converted) -> None:
    folder = converted()
    push(folder, hub)
    puts, commits = len(hub.lfs_puts), hub.count("commit")
    result = push(folder, hub)
    assert result.commit_url is None and result.uploaded == ()
    assert set(result.skipped) == set(local_files(folder)) | {"README.md"}
    assert len(hub.lfs_puts) == puts and hub.count("commit") == commits
    assert hub.count("lfs_batch") == 1 and hub.count("preupload") == 1
    assert len(new_commits(hub)) == 1


def test_second_push_commits_only_changed_files(hub: HubServer, converted) -> None:
    folder = converted()
    push(folder, hub)
    (folder / "config.json").write_text('{"model_type": "persimmon", "v": 2}\n')
    converted.reverify(folder)
    puts = len(hub.lfs_puts)
    result = push(folder, hub)
    second = new_commits(hub)[-1]
    assert set(second.changed) == {"config.json", "verification.json", "README.md"}
    assert set(result.uploaded) == set(second.changed)
    assert len(hub.lfs_puts) == puts  # no LFS file was sent again
    assert hub.file(REPO, "config.json") == (folder / "config.json").read_bytes()


def test_rerun_after_interrupted_push_does_not_resend_finished_files(hub: HubServer, converted) -> None:
    folder = converted()
    lfs_files = {p: d for p, d in local_files(folder).items() if p.endswith((".safetensors", ".model"))}
    assert len(lfs_files) == 3
    hub.fail_lfs_uploads_after(
        1
    )  # the storage fails after one object arrived (507: not retried by the client)
    with pytest.raises(
        HubError, match=r"could not upload the files and commit.*\(HTTP 507\) after 1 attempt"
    ):
        push(folder, hub, max_retries=0)
    # huggingface_hub uploads LFS objects concurrently, so one or two may have arrived, never all three
    finished = list(hub.lfs_puts)
    assert 1 <= len(finished) < len(lfs_files) and new_commits(hub) == []

    hub.fail_lfs_uploads_after(None)
    push(folder, hub)
    assert all(hub.lfs_puts.count(done) == 1 for done in finished)  # not sent again
    assert sorted(hub.lfs_puts) == sorted(sha(d) for d in lfs_files.values())
    [commit] = new_commits(hub)
    for path, data in local_files(folder).items():
        assert hub.file(REPO, path) == data


def test_transient_errors_are_retried(hub: HubServer, converted) -> None:
    folder = converted()
    hub.inject("create_repo", 503, times=2)
    hub.inject("paths_info", 502, times=1)
    hub.inject("commit", 503, times=2)
    hub.inject("lfs_upload", 503, times=1)  # retried inside huggingface_hub (http_backoff)
    push(folder, hub)
    assert hub.count("create_repo") == 3 and hub.count("commit") == 3
    [commit] = new_commits(hub)
    for path, data in local_files(folder).items():
        assert hub.file(REPO, path) == data
    assert len(hub.lfs_puts) == 3  # the LFS objects uploaded before the failed commits were not re-sent


def test_persistent_5xx_fails_after_bounded_retries(hub: HubServer, converted) -> None:
    hub.inject("commit", 503, times=100)
    with pytest.raises(HubError, match=r"kept failing \(HTTP 503\) after 3 attempts") as err:
        push(converted(), hub, max_retries=2)
    assert "re-run" in (err.value.hint or "")
    assert hub.count("commit") == 3
    assert new_commits(hub) == []


def test_commit_whose_answer_was_lost_is_not_made_twice(hub: HubServer, converted) -> None:
    folder = converted()
    hub.inject("commit", 503, times=1, after=True)  # the commit happens, the client sees a 503
    result = push(folder, hub)
    [commit] = new_commits(hub)
    assert result.commit_url == f"{hub.url}/{REPO}/commit/{commit.oid}"
    assert hub.count("commit") == 1


# ---- permanent errors --------------------------------------------------------------------------------------


def test_bad_token_fails_fast_with_a_hint(hub: HubServer, converted) -> None:
    with pytest.raises(HubError, match="401") as err:
        push(converted(), hub, token="hf_wrong")
    assert "HF_TOKEN" in err.value.hint and "hf auth login" in err.value.hint
    assert hub.count("create_repo") == 1  # not retried
    assert hub.repos == {}


def test_no_token_at_all_is_a_401(hub: HubServer, converted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="401") as err:
        push(converted(), hub)
    assert "hf auth login" in err.value.hint


def test_forbidden_namespace_is_403(hub: HubServer, converted) -> None:
    hub.create_repo_direct("bob/model", owner="bob")
    with pytest.raises(HubError, match="403") as err:
        push(converted(), hub, "bob/model")
    assert "write access" in err.value.hint
    assert new_commits(hub, "bob/model") == []


@pytest.mark.parametrize("repo_id", ["datasets/alice/x", "alice/bad--name", "a/b/c", "no-namespace"])
def test_invalid_repo_ids_are_refused_locally(hub: HubServer, converted, repo_id: str) -> None:
    with pytest.raises(UsageError):
        push(converted(), hub, repo_id)
    assert hub.requests == []


def test_missing_pr_ref_is_a_revision_error(hub: HubServer, converted) -> None:
    with pytest.raises(HubError, match="revision .refs/pr/7. not found"):
        push(converted(), hub, revision="refs/pr/7")


# ---- branches and pull requests ----------------------------------------------------------------------------


def test_revision_branch_is_created_from_main(hub: HubServer, converted) -> None:
    folder = converted()
    repo = hub.create_repo_direct(REPO)
    main_head = repo.branches["main"]
    result = push(folder, hub, revision="bf16")
    assert repo.branches["main"] == main_head  # main untouched
    commit = repo.commits[repo.branches["bf16"]]
    assert commit.parent == main_head and commit.ref == "bf16"
    assert hub.file(REPO, "config.json", "bf16") == (folder / "config.json").read_bytes()
    assert result.plan.revision == "bf16"
    # pushing again to the existing branch: nothing to do
    assert push(folder, hub, revision="bf16").commit_url is None


def test_create_pr_opens_a_pull_request(hub: HubServer, converted) -> None:
    folder = converted()
    repo = hub.create_repo_direct(REPO)
    main_head = repo.branches["main"]
    result = push(folder, hub, create_pr=True)
    assert result.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert repo.branches["main"] == main_head
    assert repo.prs[1] in result.commit_url
    assert hub.file(REPO, "tokenizer.model", "refs/pr/1") == (folder / "tokenizer.model").read_bytes()
    [commit] = new_commits(hub)
    assert commit.pr_num == 1


def test_verification_json_is_published_unchanged(hub: HubServer, converted) -> None:
    folder = converted()
    push(folder, hub)
    published = json.loads(hub.file(REPO, "verification.json"))
    assert published == json.loads((folder / "verification.json").read_text())


def test_pushed_repo_reads_back_through_the_client(hub: HubServer, converted, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    folder = converted()
    push(folder, hub)
    api = HfApi(endpoint=hub.url, token=hub.token)
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == set(local_files(folder)) | {"README.md", ".gitattributes"}
    assert tree["tokenizer.model"].lfs.sha256 == sha((folder / "tokenizer.model").read_bytes())
    path = api.hf_hub_download(REPO, "model-00002-of-00002.safetensors", local_dir=tmp_path / "dl")
    assert Path(path).read_bytes() == (folder / "model-00002-of-00002.safetensors").read_bytes()
