"""Hub wing: publish a verified folder to the Hugging Face Hub.

The push itself (``push``), what a push would send compared with the remote (``plan``), which Hub failures are
retried and how the rest are explained (``errors``), and the model card (``model_card``).

May import: ``conversion`` (the folder's records and fingerprints), ``verification``, ``tokenizer``,
``megatron``, ``mapping``, ``ops``, ``errors``. Never ``synth`` or ``cli``.
"""
