"""What the Hub already holds: the target revision's files (``get_paths_info``), compared with the local ones.

``remote_plan`` is asked before every commit attempt; ``dry_run_plan`` asks it for ``push --dry-run`` and,
when the Hub cannot be reached (offline mode, DNS failure, refused connection, no answer within the
timeouts and the deadline), returns the local plan with ``remote_unknown`` saying why.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RevisionNotFoundError

from persimmon_tools.hub.errors import HubUnreachable, Retry
from persimmon_tools.hub.plan import LocalFile, PlannedFile, PushPlan, compare_with_remote

logger = logging.getLogger("persimmon_tools.hub.push")

_PATHS_PER_REQUEST = 50


def dry_run_plan(
    api: HfApi, plan: PushPlan, local: list[LocalFile], call: Retry, offline: str | None
) -> PushPlan:
    """The plan against the remote; without the Hub, the local plan with ``remote_unknown`` set."""
    repo_id, target = plan.repo_id, plan.revision
    try:
        if offline:
            raise HubUnreachable(offline)
        exists = call("look up the repository", lambda: api.repo_exists(repo_id))
        # the visibility the repo has on the Hub (--private/--public apply only when push creates it)
        private = call("look up the repository", lambda: api.repo_info(repo_id).private) if exists else None
        rev_exists = exists and call("look up the revision", lambda: api.revision_exists(repo_id, target))
        rev = target if rev_exists else constants.DEFAULT_REVISION
        planned = remote_plan(api, plan, local, rev, call) if exists else compare_with_remote(local, {})
    except HubUnreachable as err:
        logger.warning("Dry run without the Hub: %s", err.message)
        return replace(plan, files=compare_with_remote(local, {}), remote_unknown=err.message)
    return replace(
        plan, repo_exists=exists, revision_exists=rev_exists, remote_private=private, files=planned
    )


def remote_plan(
    api: HfApi, plan: PushPlan, local: list[LocalFile], rev: str, call: Retry
) -> tuple[PlannedFile, ...]:
    found: dict[str, Any] = {}
    for i in range(0, len(local), _PATHS_PER_REQUEST):
        paths = [f.path for f in local[i : i + _PATHS_PER_REQUEST]]
        entries = call("list the files on the Hub", lambda p=paths: _paths_info(api, plan.repo_id, p, rev))
        found.update({e.path: e for e in entries if hasattr(e, "blob_id")})  # files, not folders
    return compare_with_remote(local, found)


def _paths_info(api: HfApi, repo_id: str, paths: list[str], revision: str) -> list[Any]:
    try:
        return api.get_paths_info(repo_id, paths, revision=revision)
    except RevisionNotFoundError:
        if revision == constants.DEFAULT_REVISION:  # a repo without any commit yet: nothing is there
            return []
        raise
