"""Megatron wing: ADEPT releases, ``model_optim_rng.pt`` and Megatron-Core ``torch_dist`` checkpoints, read and
written.

Reading: release discovery (tar read in place and checked to its end-of-archive, folders, ``iter_*``, one
``.pt``, a torch_dist root or iteration folder; base/chat from the release's own name), byte sources, the torch
zip reader, the restricted unpickler, lazy tensors, torch_dist's ``.metadata`` and chunk files
(``dist_pickle``, ``dist_metadata``, ``dist_layout``, ``dist_checkpoint``: byte layer, shared with verify), the
shard consistency checks, the TP/PP merge (``dist_legacy`` for torch_dist chunks) and safe ``unpack``.
Writing: ``.pt`` and tar files in ADEPT's layout (used by ``synth`` and ``export``) and torch_dist checkpoints
(``dist_writer``).

May import: the root modules below it (``persimmon_tools.mapping``, ``ops``, ``staged_output``,
``staged_leftovers``, ``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``, ``errors``). Never
another wing (``tokenizer`` is its sibling) or ``workflow``.
"""
