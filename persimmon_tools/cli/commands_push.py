"""``persimmon-tools push``: publish a verified converted folder to the Hugging Face Hub."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from persimmon_tools.cli import Command, common_options, echo_json, is_quiet
from persimmon_tools.cli.params import SafePath
from persimmon_tools.hub.network import CONNECT_TIMEOUT, DEADLINE, READ_TIMEOUT
from persimmon_tools.hub.plan import CARD_MODES
from persimmon_tools.safe_read import format_size

if TYPE_CHECKING:
    from persimmon_tools.hub.push import PushResult


@click.command("push", cls=Command)
@click.argument("out_dir", type=SafePath(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option(
    "--private/--public", default=None, help="Visibility when the repo is created (default: Hub's)."
)
@click.option("--revision", metavar="BRANCH", help="Branch to push to; created from main when missing.")
@click.option("--create-pr", is_flag=True, help="Open a pull request (against --revision or main).")
@click.option("--commit-message", metavar="TEXT", help="Commit title (default names the model and tool).")
@click.option("--token", metavar="T", help="Hub token (default: HF_TOKEN, then the `hf auth login` token).")
@click.option(
    "--endpoint",
    metavar="URL",
    help="Hub URL, http(s)://HOST[:PORT] (default: HF_ENDPOINT, then https://huggingface.co).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show what would be uploaded, and the card; upload nothing. Works offline (remote state unknown).",
)
@click.option(
    "--allow-unverified", is_flag=True, help="Publish without a passing, current verification.json."
)
@click.option("--license", "license_", metavar="ID", help="Licence id for the card (default by variant).")
@click.option(
    "--card",
    type=click.Choice(CARD_MODES),
    default="keep",
    show_default=True,
    help="keep a README.md already in OUT_DIR, or replace it with the generated card.",
)
@click.option(
    "--max-retries", type=click.IntRange(min=0), default=5, show_default=True, help="Retries per call."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=READ_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help=f"A Hub request that receives (or sends) nothing for this long fails; connecting may take at most "
    f"{CONNECT_TIMEOUT:g} s (or --timeout if less). DNS failures and refused connections fail at once.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=DEADLINE,
    show_default=True,
    metavar="SECONDS",
    help="A Hub step (look-up, listing, repo or branch creation) ends after this long, its retries and the "
    "request in flight included; every answer, the upload's too, must be complete within this long of its "
    "request being sent (a server that trickles bytes cannot hold push). The upload as a whole is bounded by "
    "--max-retries.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")
@common_options
def push_cmd(
    out_dir: Path,
    repo_id: str,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    token: str | None,
    endpoint: str | None,
    dry_run: bool,
    allow_unverified: bool,
    license_: str | None,
    card: str,
    max_retries: int,
    timeout: float,
    deadline: float,
    as_json: bool,
) -> None:
    """Publish converted folder OUT_DIR to the Hub model repo REPO_ID in one commit.

    Like `hf upload` (only the folder's own regular files; a folder holding links, FIFOs, sockets or
    devices is refused), plus a model card (licence by variant, provenance, verification metrics, usage,
    caveats), a dry run, and a refusal to publish a folder whose verification.json is missing, failed, or
    no longer matches the files. Files the repo already has with the same content are not sent again, so
    re-running an interrupted push finishes it.

    \b
    Examples:
      persimmon-tools push ./persimmon-8b-chat-hf me/persimmon-8b-chat --dry-run
      persimmon-tools push ./persimmon-8b-chat-hf me/persimmon-8b-chat --private
      persimmon-tools push ./persimmon-8b-base-hf my-org/persimmon-8b-base --revision bf16 --create-pr
    """
    if is_quiet() or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if logging.getLogger().level > logging.DEBUG:  # one INFO line per HTTP request is noise unless -v
        for name in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # imported here, not at the top: only push needs huggingface_hub's client (slow to import)
    from persimmon_tools.hub.push import PushOptions, push_folder

    options = PushOptions(
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
        endpoint=endpoint,
        dry_run=dry_run,
        allow_unverified=allow_unverified,
        license=license_,
        card=card,
        max_retries=max_retries,
        timeout=timeout,
        deadline=deadline,
    )
    result = push_folder(out_dir, repo_id, options)
    if as_json:
        echo_json(asdict(result))
    elif dry_run:
        _render_plan(result)
    else:
        _render_result(result)


def _render_plan(result: PushResult) -> None:
    plan = result.plan
    unknown = plan.remote_unknown
    click.echo("Dry run: nothing was uploaded.")
    if unknown:
        click.echo(f"Remote:     unknown, the Hub was not reached ({unknown})")
    click.echo(f"Repository: {plan.repo_id} ({plan.repo_url}; {plan.describe_repo()})")
    pr = "; a pull request would be opened" if plan.create_pr else ""
    click.echo(f"Revision:   {plan.revision} ({plan.describe_revision()}{pr})")
    click.echo(f"Verified:   {'yes' if plan.verified else 'NO (--allow-unverified)'}")
    click.echo(f"Token:      {plan.token}")
    click.echo(f"Commit:     {plan.commit_message}")
    if unknown:
        click.echo(f"Files: {len(plan.files)} to upload at most (which the Hub already has is unknown)")
    else:
        click.echo(
            f"Files: {len(plan.to_upload)} to upload, {len(plan.skipped)} already on the Hub (skipped)"
        )
    width = max((len(f.path) for f in plan.files), default=0)
    for f in plan.files:
        action = "skip  " if f.remote_identical else "upload"
        note = "  (same content on the Hub)" if f.remote_identical else ""
        kind = "LFS" if f.lfs else "regular"
        click.echo(f"  {action} {f.path:<{width}}  {format_size(f.size):>10}  {kind:<7}{note}")
    source = "README.md from the folder, kept" if plan.card_source == "kept" else "generated"
    click.echo(f"Model card (README.md, {source}):")
    click.echo("-" * 72)
    click.echo(plan.card.rstrip("\n"))
    click.echo("-" * 72)


def _render_result(result: PushResult) -> None:
    if result.commit_url is None:
        click.echo(f"Nothing to push: {result.plan.repo_id}@{result.plan.revision} already has these files.")
        return
    if not result.uploaded:
        click.echo(f"Already pushed: an earlier attempt's commit went through. Commit: {result.commit_url}")
        return
    n_up, n_skip = len(result.uploaded), len(result.skipped)
    click.echo(f"Pushed {n_up} file(s) to {result.plan.repo_id}@{result.plan.revision} ({n_skip} unchanged).")
    click.echo(f"Commit: {result.commit_url}")
    if result.pr_url:
        click.echo(f"Pull request: {result.pr_url}")


COMMANDS = [push_cmd]
