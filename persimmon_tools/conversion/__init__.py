"""Conversion wing: a Megatron checkpoint -> a Hugging Face Persimmon folder.

Config from the checkpoint's own args, the plan over THE TABLE (``persimmon_tools.mapping``), the streaming
safetensors writer, the all-or-nothing output folder, the folder's records (``conversion.json`` and file
fingerprints) and ``inspect``.

The public function is ``persimmon_tools.convert`` (``persimmon_tools.workflow``: this wing's conversion,
then the automatic verify); this package is not called ``convert`` because Python binds a submodule onto
its parent package, which would shadow that function.

May import: ``megatron``, ``tokenizer`` and the root modules below them (``mapping``, ``ops``,
``staged_output``, ``staged_leftovers``, ``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``,
``errors``). Never ``synth`` (its sibling), ``verification``, ``export``, ``hub``, ``workflow``, ``cli`` or
``testing``.
"""
