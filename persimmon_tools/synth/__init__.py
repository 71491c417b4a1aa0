"""Synth wing: random-weight releases in ADEPT's exact layout, for tests, CI smoke tests, demos and benchmarks.

The presets and tensor values (``values``), one shard's checkpoint object as ADEPT's training saves it
(``shard``) and the release builder (``build``), written with the Megatron wing's ``.pt``/tar writer.

May import: ``megatron``, ``tokenizer`` and the root modules below them (``mapping``, ``ops``,
``staged_output``, ``staged_leftovers``, ``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``,
``errors``). Never ``conversion`` (its sibling), ``verification``, ``export``, ``hub``, ``workflow``, ``cli``
or ``testing``.
"""
