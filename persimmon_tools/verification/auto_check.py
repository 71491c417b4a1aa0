"""``convert``'s automatic verify: whether it runs, and what it is estimated to cost (for ``--dry-run``).

Kept apart from :mod:`persimmon_tools.verification.verify` (the check itself) so that ``convert --dry-run``
can answer without loading the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO_VERIFY_MAX_PARAMS = 1_500_000_000  # `convert` verifies on CPU by default below this size


def should_auto_verify(dims, device: str = "cpu") -> bool:
    """Whether ``convert`` should verify by default: models below 1.5B parameters on CPU, any size on CUDA.

    ``dims``: anything with ``num_parameters()`` (:class:`persimmon_tools.conversion.config.ModelDims`).
    """
    n = dims.num_parameters()
    return n < AUTO_VERIFY_MAX_PARAMS if device == "cpu" else True


# Calibrated on the automatic verify (CPU, fp32, the default prompts) of the tiny and mid presets; the runs,
# their figures and the command that repeats them are in docs/performance.md ("Other figures").
VERIFY_BASE_RSS = 400 << 20  # python, torch, transformers and tokenizers loaded
VERIFY_FIXED_SECONDS = 14.0  # imports, tokenizer, two readers, hashing of a tiny model (tiny preset)
VERIFY_SECONDS_PER_PARAM = (53.0 - VERIFY_FIXED_SECONDS) / 537_090_048  # the rest, scaled from the mid preset


@dataclass(frozen=True)
class VerifyEstimate:
    """What ``convert``'s automatic verify would do (:func:`estimate_auto_verify`), for ``--dry-run``."""

    runs: bool
    why: str
    loader: str | None = None
    peak_memory_bytes: int | None = None
    seconds: float | None = None
    basis: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "runs": self.runs,
            "why": self.why,
            "loader": self.loader,
            "estimated_peak_memory_bytes": self.peak_memory_bytes,
            "estimated_seconds": self.seconds,
            "basis": self.basis,
        }


def estimate_auto_verify(dims, stored_bytes: int, device: str = "cpu") -> VerifyEstimate:
    """Whether ``convert`` would verify ``dims`` on ``device``, and an estimate of verify's peak memory and time.

    ``stored_bytes``: the converted folder's weight bytes. The converted side is loaded whole by transformers
    in fp32 when it fits (:func:`.transformers_side.fits`): the model (4 bytes a parameter) plus the folder's
    shards mapped while loading; otherwise both sides run layer by layer, about 1.5 layers in fp32 at a time.
    Both on top of :data:`VERIFY_BASE_RSS`. Calibrated on the runs in docs/performance.md (within 10% of
    them); the time is scaled from the same runs and depends on the CPU.
    """
    import importlib.util

    from persimmon_tools.verification.transformers_side import CPU_LIMIT_BYTES, _mem_available

    n = dims.num_parameters()
    if not should_auto_verify(dims, device):
        return VerifyEstimate(
            False,
            f"{n:,} parameters: the automatic check runs on CPU below {AUTO_VERIFY_MAX_PARAMS:,}; "
            "run `persimmon-tools verify` yourself (--device cuda on a GPU)",
        )
    heads = dims.vocab_size * dims.hidden_size * (2 if dims.untied else 1) + 2 * dims.hidden_size
    per_layer = max(n - heads, 0) // max(dims.num_layers, 1)
    whole = n * 4  # fp32 on CPU
    have = importlib.util.find_spec("transformers") is not None
    if have and whole <= min(CPU_LIMIT_BYTES, _mem_available() // 2):
        loader, peak = "transformers", VERIFY_BASE_RSS + whole + stored_bytes
    else:
        loader, peak = "persimmon-tools", VERIFY_BASE_RSS + int(1.5 * per_layer * 4)
    seconds = round(VERIFY_FIXED_SECONDS + VERIFY_SECONDS_PER_PARAM * n, 0)
    return VerifyEstimate(
        True,
        f"on CPU in fp32: {n:,} parameters, below {AUTO_VERIFY_MAX_PARAMS:,}",
        loader,
        peak,
        seconds,
        "estimates scaled from verify runs measured on 2026-11-29 on a 2-CPU machine, tiny and mid presets; "
        "the time depends on the CPU",
    )
