"""Captions that teach the base model concepts rather than strings.

Every training cell (emoji, style) gets ``VARIANTS`` captions, drawn with a seeded RNG:

- ``an emoji of {name}``: the Unicode name, always there, so prompts name what they want;
- 30%: ``, {keywords}``: one to three CLDR keywords not already in the name (``cat face`` ->
  ``kitten, pet``), so words shared across emoji (cat, face, fruit) carry meaning of their own;
- 60%: ``, {style phrase}`` (``noto style``, ``line art style`` ...): a style that can be asked
  for, or left out; without it the model samples across the five styles;
- 50%: one or two words the captions never use otherwise (drawn from the CLIP vocabulary) put
  anywhere in the caption, 30% of them as ``<word>``, so a word the model has never learned
  (``sks``, ``<sks>``) changes nothing;
- the training loop drops 10% of captions to "" for classifier-free guidance.

``RESERVED`` words never appear: the rare tokens users and tests put in prompts (``sks``) and the
name of the style the base must not know (``twemoji``), so robustness to them is learned, not seen.
"""

from __future__ import annotations

import random
import re

STYLE_PHRASES = {
    "noto": "noto style",
    "openmoji": "openmoji style",
    "fluent-flat": "fluent flat style",
    "fluent-modern": "fluent gradient style",
    "fluent-line": "line art style",
}
TEMPLATE = "an emoji of {}"
VARIANTS = 4
P_KEYWORDS, P_STYLE, P_JUNK = 0.3, 0.6, 0.5
P_BRACKETS = 0.3  # of junk words written as <word>, the way users write their new tokens
RESERVED = {"sks", "twemoji", "twitter", "tweet"}


def caption_words(cells: list[dict]) -> set[str]:
    """Every word a caption can hold on purpose (names, keywords, style phrases, template)."""
    text = " ".join([TEMPLATE, *STYLE_PHRASES.values()] + [c["name"] + " " + " ".join(c["keywords"]) for c in cells])
    return set(re.findall(r"[a-z]+", text.lower()))


def junk_pool(vocab: dict[str, int], cells: list[dict]) -> list[str]:
    """Whole-word CLIP tokens (3-10 letters) that no caption uses and no test reserves, sorted."""
    used = caption_words(cells) | RESERVED
    words = {t[:-4] for t in vocab if t.endswith("</w>")}
    return sorted(w for w in words if w.isascii() and w.isalpha() and 3 <= len(w) <= 10 and w not in used)


def captions_for(cell: dict, rng: random.Random, junk: list[str]) -> list[str]:
    out = []
    name_words = set(cell["name"].split())
    keywords = [k for k in cell["keywords"] if k not in name_words and k != cell["name"]]
    for _ in range(VARIANTS):
        parts = [TEMPLATE.format(cell["name"])]
        if keywords and rng.random() < P_KEYWORDS:
            parts.append(", ".join(rng.sample(keywords, min(len(keywords), rng.randint(1, 3)))))
        if rng.random() < P_STYLE:
            parts.append(STYLE_PHRASES[cell["style"]])
        words = ", ".join(parts).split(" ")
        if rng.random() < P_JUNK:
            for _ in range(rng.randint(1, 2)):
                word = rng.choice(junk)
                words.insert(rng.randint(0, len(words)), f"<{word}>" if rng.random() < P_BRACKETS else word)
        out.append(" ".join(words))
    return out
