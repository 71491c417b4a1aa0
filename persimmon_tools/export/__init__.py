"""Export: a Hugging Face Persimmon folder or a Megatron source → ADEPT's Megatron layout at any TP/PP.

The inverse of ``conversion``: THE TABLE (:mod:`persimmon_tools.mapping`) read target → source, the merge
ops run backwards (:func:`persimmon_tools.ops.shard_bounds`), the release layout written by
:mod:`persimmon_tools.megatron.release_writer` (shared with ``make-release``).

Since 2026-12-07 (0.1.0), ``--format torch_dist`` writes a Megatron-Core ``torch_dist`` checkpoint instead
(:mod:`persimmon_tools.export.torch_dist`: THE TABLE's Megatron-Core column,
:mod:`persimmon_tools.megatron.dist_writer`), with the Megatron-LM flags that load it
(:mod:`persimmon_tools.export.core_args`).

May import: ``conversion``, ``synth``, ``megatron``, ``tokenizer`` and the root modules below them
(``mapping``, ``ops``, ``staged_output``, ``staged_leftovers``, ``staged_record``, ``safe_read``,
``safe_write``, ``safe_graph``, ``errors``). Never ``verification`` (its sibling), ``hub``, ``workflow``,
``cli`` or ``testing``.
"""
