"""A CLIP-format byte-level BPE tokenizer written from scratch (no hub download).

The base vocabulary holds all 256 byte-level characters, with and without the `</w>` end-of-word
suffix, so any prompt tokenizes. Merges are learned by plain BPE on the dataset's words so each of
them becomes one token: short sequences keep the text encoder tiny and fast.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ds_diffusers.embedded.shapes import CAPTION_TEMPLATES, PALETTE, SHAPES

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
# Words outside the captions that validation prompts commonly use; cheap to make single tokens.
_EXTRA_WORDS = ("an", "the", "and", "with", "photo", "image", "of", "shape", "black", "small", "big", "large")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, so BPE never sees whitespace/control bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codepoints)))


def corpus_words() -> list[str]:
    """Every word of every caption template and class name, plus a few common prompt words."""
    words = set(_EXTRA_WORDS) | set(PALETTE) | set(SHAPES)
    for template in CAPTION_TEMPLATES:
        words.update(w for w in template.replace(",", " ").split() if not w.startswith("{"))
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair until every word is one symbol.

    Ties break on the pair itself so the result is deterministic. Replaying merges in rank order at
    encode time reproduces exactly these segmentations, which ad-hoc per-word merges would not.
    """
    segmented = {w: tuple(w[:-1]) + (w[-1] + _END_OF_WORD,) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for symbols in segmented.values() for p in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = tuple(merged)


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id order: byte chars, byte chars + `</w>`, merge results, then the two specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + _END_OF_WORD for c in chars] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(out_dir: Path, model_max_length: int) -> None:
    """Write vocab.json, merges.txt and the configs a `CLIPTokenizer.from_pretrained` expects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(corpus_words())
    vocab = build_vocab(merges)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text)
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
