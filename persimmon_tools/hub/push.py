"""Publish a converted folder to the Hugging Face Hub: ``hf upload`` plus a model card, a dry run and a
refusal to publish what was not verified.

Only the folder's own regular files are sent: a folder holding a symbolic link, FIFO, socket or device
anywhere below it is refused before anything in it is read (``local.scan_folder``), and the file list of
the plan is the only source of the upload (explicit ``CommitOperationAdd`` operations; nothing walks the
folder again).

Only the public ``huggingface_hub.HfApi`` flow is used: ``create_repo(exist_ok=True)``,
``revision_exists`` / ``create_branch``, ``get_paths_info`` (what the target revision already holds) and one
``create_commit`` with the new or changed files. Files the remote already has at the same path with the same
content (LFS sha256, or git blob id for regular files) are left out; if nothing is left, no commit is made.
LFS objects uploaded by an interrupted run are not sent again either: the LFS batch endpoint answers
"already present" for them and ``huggingface_hub`` skips them.

Every request has connect/read timeouts (``network.hub_timeouts``), the Hub URL is checked before any call
(``network.resolve_endpoint``), and each Hub step is retried with bounded exponential backoff and a total
deadline on 5xx, 408, 429, timeouts and dropped connections (``huggingface_hub`` itself also retries
preupload and LFS transfers); offline mode, DNS failures and refused connections fail at once, and anything
else fails at once as a :class:`~persimmon_tools.errors.HubError` with a hint (``hub.errors`` holds the
table).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

from persimmon_tools import __version__
from persimmon_tools.conversion.fingerprint import fingerprint_folder
from persimmon_tools.errors import HubError, Interrupted, UsageError
from persimmon_tools.hub.credentials import HOW_TO_LOG_IN, find_token, needs_token_up_front, no_token_error
from persimmon_tools.hub.errors import HubUnreachable, Retry, signals_raise_interrupt
from persimmon_tools.hub.local import (
    FolderScan,
    check_records,
    check_verification,
    choose_card,
    commit_description,
    default_message,
    read_verification_report,
    refuse_megatron_release,
    scan_folder,
    verification_state,
)
from persimmon_tools.hub.network import (
    CONNECT_TIMEOUT,
    DEADLINE,
    READ_TIMEOUT,
    Timeouts,
    hub_timeouts,
    resolve_endpoint,
)
from persimmon_tools.hub.plan import (
    CARD_MODES,
    LocalFile,
    PlannedFile,
    PushPlan,
    local_files,
)
from persimmon_tools.hub.remote import dry_run_plan, remote_plan

__all__ = ["PushOptions", "PushResult", "check_verification", "push_folder", "verification_state"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """Outcome of :func:`push_folder`. ``commit_url`` is ``None`` for a dry run and when nothing changed."""

    repo_url: str
    commit_url: str | None
    pr_url: str | None
    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]
    card: str
    plan: PushPlan
    dry_run: bool


@dataclass(frozen=True)
class PushOptions:
    """Options of :func:`push_folder` (the ``push`` command's flags).

    Attributes:
        private: ``True``/``False`` for a private/public repo when it is created; ``None``: the Hub's default.
        revision: Target branch (created from ``main`` when missing) or an existing ``refs/pr/N``.
        create_pr: Open a pull request against ``revision`` (default ``main``) instead of committing to it.
        commit_message: Commit title; the default names the model and the tool.
        token: Hub token; default ``HF_TOKEN``, then the token stored by ``hf auth login``. With none at all a
            push to huggingface.co is refused before anything is read (HubError); to another endpoint it is
            tried (with a warning); ``dry_run`` says a real push would need one.
        endpoint: Hub URL (``http(s)://host[:port]``); default ``HF_ENDPOINT``, then https://huggingface.co.
        dry_run: Only read the remote and return the plan; upload nothing. Without the Hub (offline,
            unreachable) the plan has ``remote_unknown`` set to the reason.
        allow_unverified: Publish although verification is missing, failed or stale; the card says so.
        license: Licence id for the generated card (default by variant: base apache-2.0, chat cc-by-nc-4.0).
        card: ``"keep"`` a README.md already in the folder, or ``"replace"`` it by the generated card (the
            folder itself is never modified).
        max_retries: Retries of each Hub step on transient errors (5xx, 408, 429, timeouts, dropped
            connections; not DNS failures or refused connections).
        retry_base_delay: First backoff delay in seconds; doubles on each retry, capped at 30 s.
        timeout: Seconds a request may wait for the Hub's next bytes (or to send the next block); opening a
            connection may take ``min(10, timeout)`` s.
        deadline: Seconds after which a step other than the upload starts no further retry (``None``: none).
    """

    private: bool | None = None
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None
    endpoint: str | None = None
    dry_run: bool = False
    allow_unverified: bool = False
    license: str | None = None  # the Hub's metadata key and the CLI flag are "license"
    card: str = "keep"
    max_retries: int = 5
    retry_base_delay: float = 1.0
    timeout: float = READ_TIMEOUT
    deadline: float | None = DEADLINE


def push_folder(folder: Path, repo_id: str, options: PushOptions = PushOptions()) -> PushResult:
    """Publish a converted folder to a Hub model repo in one commit.

    Args:
        folder: Output of ``persimmon-tools convert`` (and ``verify``); only its own regular files are sent.
        repo_id: ``namespace/name`` of the model repo; created if missing (``options.private`` applies then).
        options: A :class:`PushOptions`.

    Returns:
        A :class:`PushResult`: the plan, commit and PR URLs, uploaded and skipped files, the card text.

    Raises:
        HubError: refused (links or special files in the folder, not verified, files changed since) or the
            Hub failed (:class:`~persimmon_tools.hub.errors.HubUnreachable`: no answer at all); with a hint.
        UsageError: bad repo id, endpoint, card mode, timeout, folder or unknown licence.
        Interrupted: SIGINT/SIGTERM; re-running finishes the push without re-sending what the Hub has.

    Example:
        >>> push_folder(Path("persimmon-8b-chat-hf"), "me/persimmon-8b-chat", PushOptions(dry_run=True))  # doctest: +SKIP
    """
    timeouts = Timeouts(min(CONNECT_TIMEOUT, options.timeout), options.timeout, options.deadline)
    with signals_raise_interrupt(), hub_timeouts(timeouts):
        try:
            return _push(
                Path(folder),
                repo_id,
                options,
                Retry(options.max_retries, options.retry_base_delay, deadline=options.deadline),
            )
        except KeyboardInterrupt as err:
            raise Interrupted(
                "push interrupted before it finished",
                hint="re-run the same command to finish it: files the Hub already has are not sent again",
            ) from err


def _push(folder: Path, repo_id: str, options: PushOptions, call: Retry) -> PushResult:
    private, create_pr = options.private, options.create_pr
    _check_args(folder, repo_id, options.card, call.max_retries)
    endpoint = call.endpoint = resolve_endpoint(options.endpoint, constants.ENDPOINT)
    offline = constants.is_offline_mode()
    token = find_token(options.token)
    call.token = token.source
    if not token.found and not options.dry_run:  # before hashing gigabytes: say so first
        if needs_token_up_front(endpoint):
            raise no_token_error(endpoint, offline=offline)
        logger.warning(
            "No Hub token found (no --token, no HF_TOKEN, no stored login): pushing to %s without one, "
            "which it refuses unless it accepts anonymous writes",
            endpoint,
        )
    if offline and not options.dry_run:  # before hashing gigabytes: this push cannot happen
        raise HubUnreachable(
            f"cannot push to {endpoint}: HF_HUB_OFFLINE is set"
            + ("" if token.found else ", and no Hub token was found"),
            hint="unset HF_HUB_OFFLINE to push; `push --dry-run` shows the local plan offline"
            + ("" if token.found else f"; {HOW_TO_LOG_IN}"),
        )
    scan = scan_folder(folder)  # refuses links and special files before anything in the folder is read
    refuse_megatron_release(scan)  # an export's output: "not converted", not "not verified"
    check_records(folder)  # a damaged record is named (file and key), not judged "stale"
    status = verification_state(folder)  # the same judgement as `inspect`'s verification status
    problems, recorded = list(status.problems), status.recorded
    if problems and not options.allow_unverified:
        raise HubError(
            f"refusing to publish {folder}: it is not verified (verification: {status.describe()})",
            hint="run `persimmon-tools verify` on the folder (again, if files changed), or pass "
            "--allow-unverified to publish anyway; the model card will then say it is unverified",
        )
    verified = not problems
    files = recorded if recorded is not None else fingerprint_folder(folder)
    card_text, card_source = choose_card(
        folder, repo_id, options.license, options.card, verified, problems, files
    )
    local = local_files(folder, files, card_text, read_verification_report(folder))
    target = options.revision or constants.DEFAULT_REVISION
    api = HfApi(
        endpoint=endpoint, token=options.token, library_name="persimmon-tools", library_version=__version__
    )
    plan = PushPlan(
        repo_id=repo_id,
        repo_url=f"{endpoint}/{repo_id}",
        revision=target,
        create_pr=create_pr,
        private=private,
        repo_exists=False,
        revision_exists=False,
        verified=verified,
        card_source=card_source,
        card=card_text,
        commit_message=options.commit_message or default_message(folder, verified),
        files=(),
        token=token.describe(),
    )
    if options.dry_run:
        plan = dry_run_plan(api, plan, local, call, "HF_HUB_OFFLINE is set" if offline else None)
        return PushResult(
            plan.repo_url, None, None, (), tuple(f.path for f in plan.skipped), card_text, plan, True
        )

    repo_url = str(
        call("create the repository", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    )
    if private is not None:
        is_private = call("look up the repository", lambda: api.repo_info(repo_id).private)
        if is_private is not None and is_private != private:
            logger.warning(
                "%s exists and is %s; --private/--public only apply when the repo is created",
                repo_id,
                "private" if is_private else "public",
            )
    is_main = target == constants.DEFAULT_REVISION  # exists, or is made by the first commit of an empty repo
    if not is_main and not call("look up the revision", lambda: api.revision_exists(repo_id, target)):
        if target.startswith("refs/"):
            raise HubError(
                f"revision {target!r} not found in {repo_id}",
                hint="--revision names a branch (created from main when missing) or an existing refs/pr/N",
            )
        logger.info("Creating branch %s from main", target)
        call("create the branch", lambda: api.create_branch(repo_id, branch=target, exist_ok=True))
    tried_commit = False

    def attempt() -> tuple[Any, tuple[PlannedFile, ...]]:
        nonlocal tried_commit
        planned = remote_plan(api, plan, local, target, call)  # again: an earlier attempt may have committed
        todo = [f for f, p in zip(local, planned, strict=True) if not p.remote_identical]
        if not todo:
            return None, planned
        logger.info(
            "Committing %d file(s) to %s@%s (%d unchanged)",
            len(todo),
            repo_id,
            target,
            len(local) - len(todo),
        )
        operations = [_operation(f, scan) for f in todo]  # the only files sent: no second walk of the folder
        tried_commit = True
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=plan.commit_message,
            commit_description=commit_description(folder, verified, files),
            revision=target,
            create_pr=create_pr,
        )
        return info, planned

    # the upload takes as long as the data needs: --max-retries and the timeouts bound it, not the deadline
    info, planned = call("upload the files and commit", attempt, deadline=False)
    plan = replace(plan, repo_url=repo_url, repo_exists=True, revision_exists=True, files=planned)
    skipped = tuple(f.path for f in plan.skipped)
    if info is not None:
        uploaded = tuple(f.path for f in plan.to_upload)
        return PushResult(repo_url, info.commit_url, info.pr_url, uploaded, skipped, card_text, plan, False)
    commit_url = None
    if tried_commit and not create_pr:  # an earlier attempt committed, but its answer was lost on the way
        sha = call("look up the revision", lambda: api.repo_info(repo_id, revision=target).sha)
        commit_url = f"{endpoint}/{repo_id}/commit/{sha}"
    logger.info("Nothing to push: %s@%s already has identical files", repo_id, target)
    return PushResult(repo_url, commit_url, None, (), skipped, card_text, plan, False)


def _check_args(folder: Path, repo_id: str, card: str, max_retries: int) -> None:
    if not folder.is_dir():
        raise UsageError(
            f"{folder} is not a folder", hint="pass the output folder of `persimmon-tools convert`"
        )
    if card not in CARD_MODES:
        raise UsageError(f"card must be one of {', '.join(CARD_MODES)}, not {card!r}")
    if max_retries < 0:
        raise UsageError(f"max_retries must be >= 0, not {max_retries}")
    kind = repo_id.split("/")[0]
    if kind in ("datasets", "spaces") and repo_id.count("/") == 2:
        raise UsageError(
            f"{repo_id!r} names a {kind[:-1]} repo; push publishes model repos",
            hint=f"use the model repo id {repo_id.split('/', 1)[1]!r}",
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"invalid repo id {repo_id!r}: {err}", hint="write it as namespace/name") from err
    if "/" not in repo_id:
        raise UsageError(f"repo id {repo_id!r} has no namespace", hint=f"write it as your-username/{repo_id}")


def _operation(f: LocalFile, scan: FolderScan) -> CommitOperationAdd:
    if isinstance(f.source, bytes):
        return CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.source)
    op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=scan.checked_path(f.path))
    op.upload_info.sha256 = bytes.fromhex(f.sha256)  # hashed when checking the folder; do not hash twice
    return op
