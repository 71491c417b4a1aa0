"""Where and how verify runs: the device and compute dtype its flags name, and the converted side's loader
(transformers when installed and the model fits, else the toolkit's layer-by-layer reader)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from persimmon_tools.errors import UsageError
from persimmon_tools.verification.findings import Finding
from persimmon_tools.verification.hf_side import HFWeights
from persimmon_tools.verification.run import LayerwiseModel
from persimmon_tools.verification.transformers_side import TransformersTrace, fits, transformers_available

if TYPE_CHECKING:
    from persimmon_tools.verification.verify import VerifyOptions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOADERS = ("auto", "transformers", "persimmon-tools")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            )
            raise UsageError(
                f"--device {name}: CUDA is not available ({why}, torch {torch.__version__})",
                hint="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine",
            )
        return torch.device(name)
    raise UsageError(f"--device {name!r} is not one of auto, cpu, cuda", hint="e.g. --device cuda")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def choose_loader(
    options: VerifyOptions, conv: HFWeights, dtype: torch.dtype, device: torch.device
) -> tuple[str, str]:
    if options.loader not in LOADERS:
        raise UsageError(f"--loader {options.loader!r} is not one of {', '.join(LOADERS)}")
    if options.loader == "persimmon-tools":
        return "persimmon-tools", "asked for (--loader persimmon-tools)"
    have = transformers_available()
    if options.loader == "transformers":
        if not have:
            raise UsageError(
                "--loader transformers: transformers is not installed",
                hint="pip install 'persimmon-tools[transformers]', or use --loader auto",
            )
        return "transformers", "asked for (--loader transformers)"
    if not have:
        return "persimmon-tools", "transformers is not installed"
    ok, why = fits(conv.hyper, dtype, device)
    return (
        ("transformers", why)
        if ok
        else ("persimmon-tools", why + ": too big for transformers, layer by layer")
    )


def converted_side(
    loader: str,
    reason: str,
    conv: HFWeights,
    dtype: torch.dtype,
    device: torch.device,
    findings: list[Finding],
) -> tuple[TransformersTrace | LayerwiseModel, str, str]:
    """The converted model to run. A folder transformers refuses to load is a failing finding; then the
    toolkit's own reader runs it, so the report still has numbers."""
    if loader == "transformers":
        try:
            return TransformersTrace(conv.folder, dtype=dtype, device=device), loader, reason
        except Exception as err:  # any refusal by transformers is reported, and fails the verdict
            import transformers

            msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            findings.append(
                Finding(
                    "load",
                    "the converted folder",
                    f"transformers {transformers.__version__} cannot load it ({msg})",
                )
            )
            reason = f"transformers failed to load the folder ({type(err).__name__}); ran it layer by layer"
    return LayerwiseModel(conv, dtype=dtype, device=device), "persimmon-tools", reason
