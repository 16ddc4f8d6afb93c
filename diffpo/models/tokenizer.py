"""An offline CLIP tokenizer built from the BPE merges that open_clip ships.

The bundled tiny model and the tests need a real ``CLIPTokenizer`` without a model hub. open_clip
carries OpenAI's CLIP byte-pair file; from it we build the same vocabulary the hub tokenizer has
(byte tokens, byte tokens + ``</w>``, one token per merge, then the two specials). Keeping only the
first ``num_merges`` merges (they are ordered by frequency) gives a consistent, smaller vocabulary
whose embedding table fits a tiny text encoder; any text still tokenises, rarer words just split
into more pieces.
"""

from __future__ import annotations

import gzip
import os

FULL_NUM_MERGES = 49152 - 256 - 2  # what CLIP uses: 48,894 merges, 49,408 tokens in all


def _bytes_to_unicode() -> list[str]:
    """The reversible byte -> printable unicode map of GPT-2/CLIP byte-level BPE, in vocab order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_bpe_merges(num_merges: int = FULL_NUM_MERGES) -> list[str]:
    """The first ``num_merges`` merges of open_clip's CLIP BPE file, as "a b" strings."""
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    if not 0 <= num_merges <= FULL_NUM_MERGES:
        raise ValueError(f"num_merges={num_merges} must lie in [0, {FULL_NUM_MERGES}]")
    return lines[1 : 1 + num_merges]  # line 0 is the version header


def build_clip_tokenizer(num_merges: int = FULL_NUM_MERGES, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with CLIP's vocabulary truncated to ``num_merges`` merges."""
    from transformers import CLIPTokenizer

    merges = clip_bpe_merges(num_merges)
    byte_tokens = _bytes_to_unicode()
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)
