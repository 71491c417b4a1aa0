"""Megatron-Core (0.16.1) as an outside oracle for the tests: it saves and loads ``torch_dist`` checkpoints of
a Persimmon-shaped ``GPTModel`` on CPU, and runs its forward pass. Tests only; the toolkit never imports it.

Run as a child process (importing megatron-core takes seconds: one child does all a test module needs)::

    python tests/megatron_core/mcore_oracle.py save '{"root": ..., "layers": 3, ...}'
    python tests/megatron_core/mcore_oracle.py load_logits '{"folder": ..., ...}'
    python tests/megatron_core/mcore_oracle.py jobs '[{"command": "save", ...}, {"command": "run", ...}, ...]'

It prints one JSON object on stdout: the job's result, or ``{"results": [...]}`` for ``jobs`` (a job that
raised gives ``{"error": traceback}`` in its place; the others still run); each result has its ``seconds``. A
JSON argument ``@PATH`` is read from the file PATH.

A job's model: ``layers``, ``hidden``, ``heads``, ``ffn``, ``vocab``, ``seq`` (max positions), optional
``eps`` (1e-5), ``rotary_base`` (25000), ``rotary_percent`` (0.5), ``dtype`` (``fp32`` | ``bf16``: the weights
as saved or loaded; every forward pass runs in fp32), ``tp`` (1; a TP=N job runs on N gloo ranks, forked from
this process), ``ids`` (token ids, ``[batch][tokens]``; logits come back as ``[batch][tokens][vocab]``).

``save`` (plus ``root``, ``seed``, optional ``iteration`` (7), ``args_names`` (``"0.16"``; ``"0.15"`` writes
``norm_epsilon`` as Megatron-LM up to core 0.15 did), ``optimizer`` (false; fp32 only: Adam's state after
one step with lr 0, ``optimizer.state.exp_avg.<model key>`` ..., and ``opt_param_scheduler``)): the
``GPTModel`` of ``mcore_gpt.py`` with seeded random weights (every LayerNorm too), saved as Megatron-LM's
``save_checkpoint`` does:
``ROOT/iter_{iteration:07d}/`` (``dist_checkpointing.save`` of ``{"args", "checkpoint_version": 3.0,
"iteration", "model": model.sharded_state_dict(...), "rng_state": ShardedObject,
"num_floating_point_operations_so_far"}`` with its ``content_metadata``) and
``ROOT/latest_checkpointed_iteration.txt``. ``args`` is the Namespace Megatron-LM's parser builds for such a
run (``megatron_lm_args.json``) with this model's sizes. Returns ``folder``, ``files``, ``logits``.
The weights are a function of ``seed`` and each tensor's global name and shape only: any TP gives the same.

``load_logits`` (plus ``folder``: an ``iter_*`` folder, or a root with a tracker file as Megatron-LM's
``--load`` takes): a ``GPTModel`` of the job's dims loads it with ``dist_checkpointing.load`` at its default
strictness (what Megatron-LM uses) and ``load_state_dict``. Returns ``logits``, ``checkpoint_only_keys``
and ``model_only_keys`` (what Megatron-Core calls missing and unexpected keys, from a second load with
``StrictHandling.RETURN_ALL``), ``module_missing``/``module_unexpected`` (``load_state_dict``), ``common``
(the common state's keys, its ``args`` fields as JSON, ``checkpoint_version``, ``iteration``,
``content_metadata``).

``run`` (``argv``, optional ``cwd``, ``timeout``; only in ``jobs``): another program between the Megatron-Core
jobs (a convert, an export), so that a test needs one child that imports megatron-core, not two.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

from mcore_gpt import build_model, forward, optimizer_after_one_step, randomise, setup_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS_SNAPSHOT = os.path.join(HERE, "megatron_lm_args.json")


# ------------------------------------------------------------------ process groups


def _init_group(rank: int, world: int, store: str):
    from datetime import timedelta

    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"file://{store}", timeout=timedelta(minutes=5)
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)


def _end_group():
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# ------------------------------------------------------------------ Megatron-LM's common state


def _decode(value):
    import importlib

    import torch

    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and "torch.dtype" in value:
        return getattr(torch, value["torch.dtype"])
    if isinstance(value, dict) and "enum" in value:
        module, name = value["enum"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)[value["name"]]
    return value


def megatron_lm_args(job: dict, root: str, iteration: int):
    """The Namespace Megatron-LM's parser builds for this run (``megatron_lm_args.json``), with the model's
    sizes, parallel sizes, dtype flags and what training sets before it saves."""
    import argparse
    import math

    import torch
    from megatron.core.enums import ModelType

    with open(ARGS_SNAPSHOT) as f:
        fields = {k: _decode(v) for k, v in json.load(f)["args"].items()}
    tp, bf16 = job.get("tp", 1), job.get("dtype", "fp32") == "bf16"
    fields.update(
        num_layers=job["layers"],
        hidden_size=job["hidden"],
        num_attention_heads=job["heads"],
        kv_channels=job["hidden"] // job["heads"],
        ffn_hidden_size=job["ffn"],
        seq_length=job["seq"],
        max_position_embeddings=job["seq"],
        padded_vocab_size=job["vocab"],
        make_vocab_size_divisible_by=math.gcd(job["vocab"] // tp, 128),
        layernorm_epsilon=job.get("eps", 1e-5),
        rotary_base=job.get("rotary_base", 25000),
        rotary_percent=job.get("rotary_percent", 0.5),
        tensor_model_parallel_size=tp,
        world_size=tp,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        save=root,
        iteration=iteration,
        curr_iteration=iteration,
        consumed_train_samples=iteration * fields["global_batch_size"],
        model_type=ModelType.encoder_or_decoder,
        do_train=True,
        do_valid=False,
        do_test=False,
    )
    if job.get("args_names", "0.16") == "0.15":  # --norm-epsilon's dest up to Megatron-LM core_v0.15
        fields["norm_epsilon"] = fields.pop("layernorm_epsilon")
    return argparse.Namespace(**fields)


CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def _rng_state():
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state()}
    state["torch_rng_state"] = torch.get_rng_state()
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    where = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", [state], (pp, tp), where, replica_id=ps.get_data_parallel_rank())


def _metadata():
    from megatron.core import parallel_state as ps

    return {**CONTENT_METADATA, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


# ------------------------------------------------------------------ the commands


def save(job: dict) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    root, iteration = job["root"], job.get("iteration", 7)
    bf16 = job.get("dtype", "fp32") == "bf16"
    model = build_model(job)
    randomise(model, job["seed"], bf16)
    folder = os.path.join(root, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    dist.barrier()
    optimizer = None
    if job.get("optimizer"):
        if bf16:
            raise ValueError("optimizer state: fp32 only (Megatron-Core's bf16 optimizer needs CUDA)")
        optimizer, scheduler = optimizer_after_one_step(model, job)
    if bf16:
        model.bfloat16()
    state = {
        "args": megatron_lm_args(job, root, iteration),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model.sharded_state_dict(metadata=_metadata()),
        "rng_state": _rng_state(),
        "num_floating_point_operations_so_far": 1.5e12 * iteration,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_metadata())
        state["opt_param_scheduler"] = scheduler.state_dict()
    strategy = FullyParallelSaveStrategyWrapper(  # Megatron-LM's default: --ckpt-fully-parallel-save
        get_default_save_sharded_strategy("torch_dist"),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
        False,
    )
    dist_checkpointing.save(state, folder, strategy, content_metadata=dict(CONTENT_METADATA))
    if dist.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    torch.manual_seed(0)
    return {"folder": folder, "files": sorted(os.listdir(folder)), "logits": forward(model, job["ids"])}


def _iteration_folder(path: str) -> str:
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        return path
    with open(tracker) as f:
        text = f.read().strip()
    return os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}")


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def load_logits(job: dict) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    folder = _iteration_folder(job["folder"])
    model = build_model(job)
    if job.get("dtype", "fp32") == "bf16":
        model.bfloat16()
    common = dist_checkpointing.load_common_state_dict(folder)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    sharded = {"model": model.sharded_state_dict(metadata={**metadata, **_metadata()})}
    loaded = dist_checkpointing.load(sharded, folder)  # Megatron-LM's default strictness
    result = model.load_state_dict(loaded["model"], strict=False)
    check = {"model": build_model(job).sharded_state_dict(metadata={**metadata, **_metadata()})}
    _, missing, unexpected = dist_checkpointing.load(check, folder, strict=StrictHandling.RETURN_ALL)
    args = common.get("args")
    torch.manual_seed(0)
    return {
        "folder": folder,
        "logits": forward(model, job["ids"]),
        "checkpoint_only_keys": sorted(missing),  # Megatron-Core's "missing": in the checkpoint, not loaded
        "model_only_keys": sorted(unexpected),  # its "unexpected": asked for, not in the checkpoint
        "module_missing": sorted(result.missing_keys),
        "module_unexpected": sorted(result.unexpected_keys),
        "common": {
            "keys": sorted(common),
            "args": None if args is None else {k: _jsonable(v) for k, v in sorted(vars(args).items())},
            "args_type": type(args).__module__ + "." + type(args).__qualname__,
            "checkpoint_version": _jsonable(common.get("checkpoint_version")),
            "iteration": _jsonable(common.get("iteration")),
            "content_metadata": _jsonable(metadata),
        },
    }


def run(job: dict) -> dict:
    """Another program (``argv``, in ``cwd``, within ``timeout`` seconds) between the Megatron-Core jobs, so that a
    test's convert/export runs need no second Megatron-Core child: ``returncode``, ``stdout``, ``stderr``."""
    import subprocess

    done = subprocess.run(
        job["argv"], cwd=job.get("cwd"), capture_output=True, text=True, timeout=job.get("timeout", 300)
    )
    return {"returncode": done.returncode, "stdout": done.stdout[-20000:], "stderr": done.stderr[-20000:]}


COMMANDS = {"save": save, "load_logits": load_logits, "run": run}


# ------------------------------------------------------------------ ranks and jobs


def run_jobs(jobs: list, rank: int, stores: str) -> list:
    """The jobs in order, each run of consecutive jobs with the same ``tp`` on a gloo group of that size; this
    process is rank ``rank`` and takes part in the groups larger than it."""
    results: list = [None] * len(jobs)
    segments: list[list[int]] = []
    for i, job in enumerate(jobs):
        if segments and jobs[segments[-1][0]].get("tp", 1) == job.get("tp", 1):
            segments[-1].append(i)
        else:
            segments.append([i])
    for n, segment in enumerate(segments):
        size = jobs[segment[0]].get("tp", 1)
        if rank >= size:
            continue
        _init_group(rank, size, os.path.join(stores, f"store_{n}"))
        try:
            for i in segment:
                start = time.monotonic()
                try:
                    results[i] = COMMANDS[jobs[i]["command"]](jobs[i])
                except Exception:
                    results[i] = {"error": traceback.format_exc()}
                results[i]["seconds"] = round(time.monotonic() - start, 3)
        finally:
            _end_group()
    return results


def main(argv: list) -> int:
    if len(argv) != 3 or argv[1] not in ("jobs", "save", "load_logits"):
        print(f"usage: {argv[0]} jobs|save|load_logits JSON|@FILE", file=sys.stderr)
        return 2
    text = argv[2]
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    payload = json.loads(text)
    jobs = payload if argv[1] == "jobs" else [{**payload, "command": argv[1]}]
    setup_cpu()
    ranks = max(job.get("tp", 1) for job in jobs)
    others: list = []
    try:
        with tempfile.TemporaryDirectory(prefix="mcore-oracle-") as stores:
            import multiprocessing

            fork = multiprocessing.get_context("fork")
            others = [fork.Process(target=_other_rank, args=(jobs, r, stores)) for r in range(1, ranks)]
            for proc in others:
                proc.start()
            results = run_jobs(jobs, 0, stores)
            for proc in others:
                proc.join()
    finally:
        _end_helpers()
    bad = [p.exitcode for p in others if p.exitcode != 0]
    if bad:
        results = [r if "error" in r else {"error": f"another rank failed: {bad}"} for r in results]
    print(json.dumps({"results": results} if argv[1] == "jobs" else results[0]), flush=True)
    return 0


def _end_helpers() -> None:
    """End the processes this one started and that outlive it otherwise: the spawned manager behind
    megatron-core's writer results queue (never shut down) holds this process's stdout open, so whoever
    reads it would wait for it. The resource tracker ignores SIGTERM and ends when they do."""
    import psutil

    children = [
        child
        for child in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(child.cmdline())
    ]
    for child in children:
        child.terminate()
    for child in psutil.wait_procs(children, timeout=5)[1]:
        child.kill()


def _other_rank(jobs: list, rank: int, stores: str) -> None:
    try:
        results = run_jobs(jobs, rank, stores)
    finally:
        _end_helpers()
    errors = [r["error"] for r in results if r and "error" in r]
    if errors:
        print(errors[0], file=sys.stderr)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
