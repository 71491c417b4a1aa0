"""The built-in parity sample: short texts that exercise every part of a SentencePiece pipeline.

``persimmon-tools convert`` refuses to write a tokenizer that disagrees with SentencePiece on any of these.
They cover many scripts, emoji sequences, code, whitespace runs, NFKC-sensitive characters (including the
stacked marks, half-width voicing marks and CR LF that tokenizers' own Precompiled normalizer gets wrong),
control characters and the empty string, plus ADEPT's chat prompt format. Written for this project.
"""

from __future__ import annotations

_TEXTS = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "a",
    "human: What is the capital of France?\n\nadept:",
    "human: Write a haiku.\n\nadept: Leaves fall on the pond\n\nhuman: Another one?\n\nadept:",
    "The persimmon ripens slowly in the late autumn sun.",
    "Crème brûlée, naïve façade, jalapeño, Ångström, smörgåsbord.",
    "Zażółć gęślą jaźń; Příliš žluťoučký kůň; Árvíztűrő tükörfúrógép.",
    "Привет, как дела? Сегодня хорошая погода.",
    "Καλημέρα, τι κάνεις σήμερα;",
    "שלום, מה שלומך היום?",
    "مرحبا، كيف حالك اليوم؟",
    "สวัสดีครับ ยินดีที่ได้รู้จัก",
    "नमस्ते, आप कैसे हैं?",
    "東京は今日も晴れです。新幹線で大阪へ行きます。",
    "我们今天去公园散步吧。",
    "안녕하세요, 만나서 반갑습니다.",
    "ｶﾀｶﾅ ﾃﾞｰﾀ Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﾊﾟﾝ",
    "ﬁnance ﬂow ﬀ ① ② ③ Ⅻ ㍿ ㎏ 豈 更 x² y³ ½",
    "e\u0301 a\u0300 o\u0308 n\u0303 a\u0323 Vie\u0302t",
    "stacked a\u0323\u0301 a\u0301\u0323 o\u0302\u0323 Ａ\u0301 \u212b\u0301 \u1100\u1161\u11a8 \u3131\u314f",
    "windows\r\nline ends\r\n",
    "👍 👍🏽 👩\u200d💻 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 🇯🇵 🇺🇸 ❤️ 1️⃣",
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\ttotal += v[i];\n}",
    "    four leading spaces, two  inner  runs,   trailing   ",
    "tab\tseparated\tvalues\n\nand\rold mac line ends",
    "----- ===== ..... !!!!! ????? _____ ~~~~~",
    "Numbers 1234567890 3.14159 -42 1e-9 0xFF 2024-01-31",
    "https://example.org/a/b?c=1&d=2 someone@example.com",
    "control\x00chars\x01here\x07and\x1bthere\x7f",
    "zero\u200bwidth\u200cjoiner\u200dand\ufeffbom",
    "nbsp\u00a0thin\u2009ideographic\u3000space",
    "€12,50 £3 ¥1000 ₹250 ₩5000 $19.99",
    "∀x ∈ ℝ: x² ≥ 0, √2 ≈ 1.414",
    "« comme ça » „so“ “this” ‘that’ 「これ」",
    "Mixed: Tokyo 東京, Moscow Москва, Athens Αθήνα, Cairo القاهرة, Seoul 서울.",
]


def builtin_sample() -> list[str]:
    """A fresh copy of the built-in parity sample (40 texts)."""
    return list(_TEXTS)
