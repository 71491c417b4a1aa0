"""One exception hierarchy for the whole toolkit.

Every error carries a message (what went wrong, naming the file, key or flag) and an optional hint (what to
do next). The CLI turns them into ``Error: ...`` / ``Hint: ...`` lines and an exit code in one place
(``persimmon_tools.cli``); the library never prints or exits.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VERIFICATION_FAILED = 3

#: Every exit status of the ``persimmon-tools`` commands, one table: (code, name, meaning). The CLI renders it
#: into each command's ``--help`` and ``docs/cli.md``; the same situation gives the same code in every command
#: (an output that exists and is not replaced is a failure, 1, with a hint naming ``--force`` where it exists).
EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (0, "ok", "success"),
    (EXIT_FAILURE, "failure", "Error:/Hint: on stderr; includes an output that exists (see --force)"),
    (EXIT_USAGE, "usage", "a flag, argument or value that cannot work"),
    (EXIT_VERIFICATION_FAILED, "verification failed", "the converted model does not match the checkpoint"),
    (130, "interrupted", "Ctrl-C or SIGTERM; temporary output was removed"),
    (141, "stdout closed", "the reader of stdout went away (| head); no message"),
)


class PersimmonToolsError(Exception):
    """Base class of every error the toolkit raises on purpose."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class UsageError(PersimmonToolsError):
    """A flag or argument combination that cannot work."""

    exit_code = EXIT_USAGE


class ReleaseError(PersimmonToolsError):
    """The release tarball / folder is missing files, ambiguous, corrupt or unsafe to extract."""


class CheckpointError(PersimmonToolsError):
    """A ``model_optim_rng.pt`` shard cannot be read, or shards do not fit together."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle references a global outside the allowlist; nothing from it was executed."""


class ConfigError(PersimmonToolsError):
    """Checkpoint arguments and tensor shapes disagree, or a setting is out of range."""


class MappingError(PersimmonToolsError):
    """Source keys that no rule maps, expected targets that are missing, wrong shapes."""


class ConversionError(PersimmonToolsError):
    """Writing the converted checkpoint failed (dtype overflow, non-finite values, disk, output dir)."""


class TokenizerError(PersimmonToolsError):
    """The SentencePiece model cannot be converted exactly, or the fast tokenizer disagrees with it."""


class VerificationError(PersimmonToolsError):
    """The converted model does not compute what the original computes."""

    exit_code = EXIT_VERIFICATION_FAILED


class HubError(PersimmonToolsError):
    """Publishing to the Hugging Face Hub failed or was refused."""


class Interrupted(PersimmonToolsError):
    """SIGINT/SIGTERM arrived; temporary output was removed."""

    exit_code = 130
