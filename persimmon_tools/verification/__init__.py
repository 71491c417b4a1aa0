"""Verification wing: prove that a converted folder computes what the Megatron checkpoint computes.

The reference forward pass written from the spec (``reference``), the prompts, ADEPT's published logits, the
metrics and tolerances, the two converted-side loaders (``hf_side`` without transformers,
``transformers_side`` with it; ``sides`` picks one, the device and the dtype), findings, diagnosis, the
lockstep run and the report; without ``--reference``, the source ``conversion.json`` records, while it is
still that source (``recorded_source``). Since 2026-12-07 also greedy generation checked against one
teacher-forced reference pass (``generation``, ``passes``), KL as a distribution (``kl``), the tokenizer
fingerprint and the verdict per check (``checks``), the pinned environment (``environment``), and the stored
reference record (``record``) that ``verify`` writes and, with no source at hand, checks against
(``stored``).

The public function is ``persimmon_tools.verify``; the package is named ``verification`` so that it does not
shadow it.

The reference side reads the source through the toolkit's one byte layer (``megatron``'s release
discovery, torch zip reader, restricted unpickler, lazy tensors) and interprets it on its own
(``source_merge``: shard grid, stage roles, renumbering, TP merge); ``agreement`` checks that this and the
converter's interpretation (``megatron.checkpoint``) read the same byte ranges before any forward pass.

May import: ``conversion`` (the folder's records), ``synth``, ``megatron``, ``tokenizer`` and the root
modules below them (``mapping``, ``ops``, ``staged_output``, ``staged_leftovers``, ``staged_record``,
``safe_read``, ``safe_write``, ``safe_graph``, ``errors``); but ``reference`` and ``source_merge`` only
``megatron``'s byte layer, never its merge, consistency checks, writers or unpack (``megatron.checkpoint``,
``megatron.consistency``, ``megatron.release_writer``, ``megatron.ptwriter``, ``megatron.unpack``),
``mapping``, ``ops`` or ``conversion``. Never ``export`` (its sibling), ``hub``, ``workflow``, ``cli`` or
``testing``.
"""
