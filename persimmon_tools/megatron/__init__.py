"""Megatron wing: ADEPT releases and ``model_optim_rng.pt`` checkpoints, read and written.

Reading: release discovery (tar read in place, folders, ``iter_*``, one ``.pt``), byte sources, the torch zip
reader, the restricted unpickler, lazy tensors, the TP/PP merge and safe ``unpack``. Writing: ``.pt`` and tar
files in ADEPT's layout (used by ``synth``).

May import: ``persimmon_tools.mapping``, ``ops``, ``errors``. Never another wing.
"""
