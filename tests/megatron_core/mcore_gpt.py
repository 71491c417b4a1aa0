"""The Megatron-Core side of ``mcore_oracle.py`` (tests only): a Persimmon-shaped ``GPTModel`` on CPU, its
seeded weights, its forward pass, and Megatron-Core's Adam after one step.

Layouts: ids ``[batch][tokens]``; logits ``[batch][tokens][vocab]``, fp32, the head's output gathered over
the TP ranks. The model is built as Megatron-LM builds Persimmon with ``--transformer-impl local``: the local
layer spec with LayerNorm and QK-LayerNorm (its ``sharded_state_dict`` names the norms as Transformer
Engine's spec does: ``linear_qkv.layer_norm_weight`` ...), squared ReLU, partial rotary (rotate-half on the
first ``rotary_percent`` of each head), an untied head, biases on every linear layer.
"""

from __future__ import annotations

import zlib


def setup_cpu():
    """What megatron-core expects of CUDA, stood in for on CPU; quiet warnings and logs."""
    import contextlib
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    import megatron.core.tensor_parallel as tp
    import megatron.core.tensor_parallel.random as tp_random

    class _NoRngTracker:  # attention/embedding dropout forks the CUDA RNG; dropout is 0 here
        def fork(self, *a, **k):
            return contextlib.nullcontext()

    tracker = _NoRngTracker()
    tp.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker = lambda *a, **k: tracker


def build_model(job: dict):
    """A Persimmon-shaped ``GPTModel`` (fp32 parameters, eval mode) in the current TP group."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=job["layers"],
        hidden_size=job["hidden"],
        num_attention_heads=job["heads"],
        ffn_hidden_size=job["ffn"],
        tensor_model_parallel_size=job.get("tp", 1),
        activation_func=lambda x: torch.pow(F.relu(x), 2),
        normalization="LayerNorm",
        layernorm_epsilon=job.get("eps", 1e-5),
        qk_layernorm=True,
        add_bias_linear=True,
        add_qkv_bias=True,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="LayerNorm")
    model = GPTModel(
        cfg,
        spec,
        vocab_size=job["vocab"],
        max_sequence_length=job["seq"],
        position_embedding_type="rope",
        rotary_percent=job.get("rotary_percent", 0.5),
        rotary_base=job.get("rotary_base", 25000),
        share_embeddings_and_output_weights=False,
        parallel_output=False,  # the head's output gathered over TP ranks
    )
    return model.eval()


def _sharded_tensors(model, metadata=None):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return [
        v for v in nested_values(model.sharded_state_dict(metadata=metadata)) if isinstance(v, ShardedTensor)
    ]


def _global_value(key: str, shape: tuple, seed: int):
    """The seeded global tensor named ``key``: LayerNorm weights U(0.5, 1.5), biases N(0, 0.1^2), the
    embedding N(0, 1), other weights N(0, 1/fan_in) (fan_in: the last dim)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    name = key.rsplit(".", 1)[-1]
    if "norm" in key and name.endswith("weight"):
        return 0.5 + torch.rand(shape, generator=gen)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    scale = 1.0 if "embedding" in key else shape[-1] ** -0.5
    return scale * torch.randn(shape, generator=gen)


def randomise(model, seed: int, bf16: bool) -> None:
    """Every parameter from :func:`_global_value`, sliced at its place in the global tensor (so the weights do
    not depend on TP); rounded to bf16 values when ``bf16``."""
    import torch

    cache: dict = {}
    written = set()
    with torch.no_grad():
        for sh in _sharded_tensors(model):
            if sh.key not in cache:
                cache[sh.key] = _global_value(sh.key, tuple(sh.global_shape), seed)
            full = cache[sh.key]
            local = full[tuple(slice(o, o + n) for o, n in zip(sh.global_offset, _padded(sh), strict=True))]
            value = local.reshape(sh.data.shape)
            sh.data.copy_(value.bfloat16().float() if bf16 else value)
            written.add(sh.data.data_ptr())
    missed = [n for n, p in model.named_parameters() if p.data_ptr() not in written]
    if missed:
        raise RuntimeError(f"parameters not reached through sharded_state_dict: {missed}")


def _padded(sh) -> tuple:
    """The local shape with the prepended (layer) axes as size 1."""
    return (1,) * sh.prepend_axis_num + tuple(sh.local_shape)


def forward(model, ids: list) -> list:
    """fp32 logits ``[batch][tokens][vocab]``, with an explicit causal mask (True = masked)."""
    import torch

    tokens = torch.tensor(ids, dtype=torch.long)
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    with torch.no_grad():
        logits = model.float()(tokens, positions, mask)
    return logits.float().tolist()


def _cuda_factories_on_cpu(*modules) -> None:
    """``torch.tensor(..., device="cuda")`` (and zeros, ones, empty, full) made on CPU in these modules."""
    import types

    import torch

    def on_cpu(factory):
        return staticmethod(
            lambda *a, device=None, **k: factory(*a, device="cpu" if device == "cuda" else device, **k)
        )

    class TorchOnCpu(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(TorchOnCpu, name, on_cpu(getattr(torch, name)))
    for module in modules:
        module.torch = TorchOnCpu("torch")


def optimizer_after_one_step(model, job: dict):
    """Megatron-Core's Adam (``get_megatron_optimizer`` over a DDP-wrapped fp32 model) after one training step
    with lr 0 (Adam's moments filled, the weights unchanged), and its lr scheduler, as Megatron-LM builds them.
    fp32 only: the bf16 optimizer insists on CUDA tensors."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer_module
    import megatron.core.utils as core_utils
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    _cuda_factories_on_cpu(clip_grads, optimizer_module, core_utils)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    config = OptimizerConfig(optimizer="adam", lr=0.0, min_lr=0.0, weight_decay=0.01, clip_grad=0.0)
    optimizer = get_megatron_optimizer(config, [ddp])
    tokens = torch.tensor(job["ids"], dtype=torch.long)
    b, s = tokens.shape
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    ddp.train()
    ddp(tokens, torch.arange(s).expand(b, s), mask).float().pow(2).mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()
    model.eval()
    scheduler = OptimizerParamScheduler(optimizer, 0.0, 0.0, 0.0, 0, 10, "linear", 0.01, 0.01, 10, "constant")
    scheduler.step(1)
    return optimizer, scheduler
