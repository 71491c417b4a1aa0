"""Conversion wing: a Megatron checkpoint -> a Hugging Face Persimmon folder.

Config from the checkpoint's own args, the plan over THE TABLE (``persimmon_tools.mapping``), the streaming
safetensors writer, the all-or-nothing output folder, the folder's records (``conversion.json`` and file
fingerprints) and ``inspect``.

The public function is ``persimmon_tools.convert``; this package is not called ``convert`` because Python
binds a submodule onto its parent package, which would shadow that function.

May import: ``megatron``, ``tokenizer``, ``mapping``, ``ops``, ``errors``. Never ``verification``, ``hub``,
``synth`` or ``cli``.
"""
