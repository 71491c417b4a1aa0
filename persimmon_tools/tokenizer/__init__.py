"""Tokenizer wing: SentencePiece ``adept_vocab.model`` -> a ``tokenizers`` fast tokenizer, checked for parity.

The proto reader (``proto``), the pipeline builders (``build``, ``charsmap``, ``unigram``, ``bpe``, ``trie``),
the parity check (``check``, ``corpus``), the files written (``write``) and small sentencepiece helpers
(``spm``) that conversion, verification and synth share.

May import: the root modules below it (``mapping``, ``ops``, ``staged_output``, ``staged_leftovers``,
``staged_record``, ``safe_read``, ``safe_write``, ``safe_graph``, ``errors``). Never another wing
(``megatron`` is its sibling) or ``workflow``.
"""
