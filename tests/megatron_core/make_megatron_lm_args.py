"""Regenerate ``megatron_lm_args.json``: the ``args`` Namespace that Megatron-LM's own argument parser builds
for a Persimmon run, which ``mcore_oracle.py`` stores in the checkpoints it saves.

Megatron-LM's training code (``megatron/training``) is not on PyPI; run this with a checkout of the tag that
matches the installed megatron-core (``core_v0.16.1``):

    git clone --branch core_v0.16.1 --depth 1 https://github.com/NVIDIA/Megatron-LM /tmp/Megatron-LM
    python tests/megatron_core/make_megatron_lm_args.py /tmp/Megatron-LM > tests/megatron_core/megatron_lm_args.json

It parses :data:`FLAGS` with ``parse_args`` and ``validate_args`` (what ``pretrain_gpt.py`` does before it
builds the model) and writes every field as JSON; a ``torch.dtype`` is written as ``{"torch.dtype": NAME}``,
an enum as ``{"enum": "module.Class", "name": NAME}``. The oracle sets the model's dimensions, the parallel
sizes and the dtype flags per checkpoint. Needs no GPU; the one module that needs triton is stood in for.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import types
import warnings

FLAGS = [
    # Persimmon-8B as a Megatron-Core GPTModel (what ADEPT's release holds, in Megatron-LM's flag names)
    *("--num-layers 36 --hidden-size 4096 --num-attention-heads 64 --ffn-hidden-size 16384").split(),
    *("--seq-length 16384 --max-position-embeddings 16384 --position-embedding-type rope").split(),
    *("--rotary-percent 0.5 --rotary-base 25000 --normalization LayerNorm --norm-epsilon 1e-5").split(),
    *("--squared-relu --qk-layernorm --untie-embeddings-and-output-weights --add-qkv-bias").split(),
    *("--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model adept_vocab.model").split(),
    # a fine-tuning run: bf16, torch_dist checkpoints
    *("--bf16 --micro-batch-size 1 --global-batch-size 8 --lr 1e-5 --train-iters 10").split(),
    *("--ckpt-format torch_dist --transformer-impl local --no-gradient-accumulation-fusion").split(),
]


def encode(value):
    import torch

    if isinstance(value, torch.dtype):
        return {"torch.dtype": str(value).removeprefix("torch.")}
    if isinstance(value, enum.Enum):
        return {"enum": f"{type(value).__module__}.{type(value).__qualname__}", "name": value.name}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value)} as JSON")


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def main(checkout: str) -> None:
    warnings.filterwarnings("ignore")
    stub = _Stub("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    sys.modules[stub.__name__] = stub  # needs triton; argument parsing never calls it
    sys.path.insert(0, checkout)
    import megatron  # a namespace package: megatron.core (installed) and the checkout's megatron.training

    megatron.__path__.append(os.path.join(checkout, "megatron"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron.training.arguments import parse_args, validate_args

    sys.argv = ["pretrain_gpt.py", *FLAGS]
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            args = validate_args(parse_args(), {})
        finally:
            sys.stdout = stdout
    fields = {k: encode(v) for k, v in sorted(vars(args).items())}
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items())
    print(
        f'{{\n "megatron_lm": "core_v0.16.1",\n "flags": {json.dumps(FLAGS)},\n "args": {{\n{rows}\n }}\n}}'
    )


if __name__ == "__main__":
    main(sys.argv[1])
