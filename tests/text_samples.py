"""Varied test strings for tokenizer checks: Unicode scripts, code, whitespace runs, emoji."""

from __future__ import annotations

import random

_PIECES = [
    "hello", "world", " the", "Ünïcödé", "naïve café", "日本語のテキスト", "中文", "한국어", "Ελληνικά",
    "русский", "עברית", "العربية", "हिन्दी", "ไทย", "🎉", "👩‍👩‍👧‍👦", "🇫🇷", "😀😃", "∑∫√∞", "€£¥",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { s += a[i]; }", "{\"key\": [1, 2.5, null]}",
    "import numpy as np", "<div class=\"a\">&amp;</div>", "SELECT * FROM t WHERE id = 3;", "x\t=\t1",
    "   ", "\n\n\n", "\t\t", " \n \t ", "\r\n", "\u00a0", "\u200b", "\x00", "\x7f", "ÿ", "Ā", "a\u0301",
    "'quoted'", "\"dq\"", "\\backslash\\", "$PATH", "#!/bin/sh", "1234567890", "3.14159", "-", "_", "~",
]


def sample_strings(n: int = 1000, seed: int = 0, specials: bool = False) -> list[str]:
    """n strings of 0..12 random pieces (plus random code points); `specials` mixes in "<s>", "</s>"."""
    rng = random.Random(seed)
    pieces = _PIECES + (["<s>", "</s>"] if specials else [])
    out = [""]
    while len(out) < n:
        parts = [rng.choice(pieces) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.3:  # any code point outside the surrogates
            parts.append("".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                                 for _ in range(rng.randint(1, 6))))
        rng.shuffle(parts)
        out.append("".join(parts) if rng.random() < 0.5 else " ".join(parts))
    return out
