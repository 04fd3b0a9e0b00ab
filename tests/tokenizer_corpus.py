"""A deterministic corpus of mixed text for comparing tokenizers against reference libraries."""

from __future__ import annotations

import random

WORDS = (
    "the quick brown fox jumps over lazy dog Hello World tokenizer model distributed inference "
    "attention transformer it's don't we'll they've I'm YOU'RE SHE'D can't Once upon a time "
    "there was little girl named Lily internationalization supercalifragilistic"
).split()
CODE = [
    "def main(argv=None):\n    return 0\n",
    "for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }",
    "    if x != y:\n\t\treturn {'key': [1, 2, 3]}\r\n",
    "const f = (a, b) => a ?? b;  // comment",
    "SELECT * FROM users WHERE id=42;",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 0x1F);}",
    "x <<= 2; y >>= 3; z === w || !v && u",
    "https://example.com/path?q=1&r=two#frag",
]
ACCENTED = ["Führer", "über", "naïve", "café", "Ångström", "señor", "crème brûlée", "Zürich", "ÉCOLE", "ﬁne", "ǅ"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303o", "A\u030a", "o\u0302\u0323"]
CJK = ["你好，世界", "日本語のテキスト", "中文测试句子。", "한국어 문장", "東京タワー", "简体字和繁體字"]
EMOJI = ["🦙", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🙂🙃", "☕"]
OTHER = ["нещо на Български", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย", "∑∫√∞", "½ ¾ ²³", "\u00a0nbsp", "\u3000ideo"]
SPECIALS = [
    "<|eot_id|>", "<|im_end|>", "<|im_start|>", "<|begin_of_text|>", "<|end_of_text|>", "<s>", "</s>",
    "<unk>", "<|endoftext|>", "<think>", "</think>", "<|start_header_id|>", "<|eot_id", "<|im_end", "<<SYS>>",
]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t  ", "    \n\n\n", "\u2581"]


def _number(rng: random.Random) -> str:
    digits = rng.choice([1, 2, 3, 4, 5, 7, 10, 13])
    text = "".join(rng.choice("0123456789") for _ in range(digits))
    return rng.choice([text, text + "." + str(rng.randint(0, 999)), "-" + text, text + "%", "$" + text])


def _fragment(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(WORDS)
    if roll < 0.45:
        return _number(rng)
    if roll < 0.55:
        return rng.choice(CODE)
    if roll < 0.62:
        return rng.choice(ACCENTED + COMBINING)
    if roll < 0.70:
        return rng.choice(CJK)
    if roll < 0.76:
        return rng.choice(EMOJI)
    if roll < 0.81:
        return rng.choice(OTHER)
    if roll < 0.87:
        return rng.choice(SPECIALS)
    if roll < 0.95:
        return rng.choice(SPACES)
    return rng.choice(".,;:!?'\"()[]{}-_/\\@#$%^&*+=~`|<>")


def make_corpus(lines: int = 2200, seed: int = 1234) -> list[str]:
    """`lines` strings of 0..24 fragments joined by random separators (deterministic)."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(0, 24)):
            parts.append(_fragment(rng))
            parts.append(rng.choice(["", " ", " ", " ", "  ", "\n", "\t"]))
        text = "".join(parts)
        if rng.random() < 0.1:
            text = rng.choice(SPACES) + text + rng.choice(SPACES)
        corpus.append(text)
    return corpus


def long_text(characters: int = 100_000, seed: int = 7) -> str:
    """About `characters` characters of mixed text, for speed measurements."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < characters:
        fragment = _fragment(rng) + rng.choice([" ", " ", "\n", ""])
        parts.append(fragment)
        size += len(fragment)
    return "".join(parts)[:characters]
