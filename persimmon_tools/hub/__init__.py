"""Hub wing: publish a verified folder to the Hugging Face Hub.

The push itself (``push``), the folder's files it may send and the verification check (``local``), what a
push would send compared with the remote (``plan``, ``remote``), the Hub URL and timeouts (``network``),
which Hub failures are retried and how the rest are explained (``errors``), which token a push sends
(``credentials``), base or chat from the folder's records (``variant``), and the model card (``model_card``).

May import: ``verification``, ``export``, ``conversion`` (the folder's records and fingerprints), ``synth``,
``megatron``, ``tokenizer`` and the root modules below them (``mapping``, ``ops``, ``staged_output``,
``staged_leftovers``, ``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``, ``errors``). Never
``workflow`` (its sibling), ``cli`` or ``testing``.
"""
