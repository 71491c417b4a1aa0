"""Synth wing: random-weight releases in ADEPT's exact layout, for tests, CI smoke tests, demos and benchmarks.

The presets and tensor values (``values``) and the release builder (``build``), written with the Megatron
wing's ``.pt``/tar writer.

May import: ``megatron``, ``tokenizer``, ``mapping``, ``ops``, ``errors``. Never ``conversion``,
``verification``, ``hub`` or ``cli``.
"""
