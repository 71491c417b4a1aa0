"""Megatron wing: ADEPT releases and ``model_optim_rng.pt`` checkpoints, read and written.

Reading: release discovery (tar read in place and checked to its end-of-archive, folders, ``iter_*``, one
``.pt``; base/chat from the release's own name), byte sources, the torch zip reader, the restricted
unpickler, lazy tensors, the shard consistency checks, the TP/PP merge and safe ``unpack``. Writing:
``.pt`` and tar files in ADEPT's layout (used by ``synth``).

May import: the root modules below it (``persimmon_tools.mapping``, ``ops``, ``staged_output``,
``staged_leftovers``, ``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``, ``errors``). Never
another wing (``tokenizer`` is its sibling) or ``workflow``.
"""
