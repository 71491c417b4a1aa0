"""Tokenizer wing: SentencePiece ``adept_vocab.model`` -> a ``tokenizers`` fast tokenizer, checked for parity.

The proto reader (``proto``), the pipeline builders (``build``, ``charsmap``, ``unigram``, ``bpe``, ``trie``),
the parity check (``check``, ``corpus``), the files written (``write``) and small sentencepiece helpers
(``spm``) that conversion, verification and synth share.

May import: ``errors`` only. Never another wing.
"""
