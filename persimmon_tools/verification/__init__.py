"""Verification wing: prove that a converted folder computes what the Megatron checkpoint computes.

The reference forward pass written from the spec (``reference``), the prompts, ADEPT's published logits, the
metrics and tolerances, the two converted-side loaders (``hf_side`` without transformers,
``transformers_side`` with it), findings, diagnosis, the lockstep run and the report.

The public function is ``persimmon_tools.verify``; the package is named ``verification`` so that it does not
shadow it.

The reference side reads the source with its own reader (``source_layout``, ``source_pickle``,
``source_tensor``, ``source_merge``), which shares no code with the converter's (``megatron``);
``agreement`` checks that both readers see the same bytes before any forward pass.

May import: ``conversion`` (the folder's records), ``megatron``, ``tokenizer``, ``mapping``, ``ops``,
``errors``; but ``reference`` and the ``source_*`` modules never ``megatron``, ``mapping``, ``ops`` or
``conversion``. Never ``hub``, ``synth`` or ``cli``.
"""
