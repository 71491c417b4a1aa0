"""persimmon-tools: ADEPT Persimmon-8B Megatron releases → verified Hugging Face checkpoints.

The library never prints, exits or prompts; the `persimmon-tools` CLI (``persimmon_tools.cli``) is a thin
layer over it. Importing this package has no side effects and does not import torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
