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


def bytes_to_unicode() -> list[str]:
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
    byte_tokens = bytes_to_unicode()
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)


def t5_vocabulary(num_merges: int = 8000) -> list[tuple[str, float]]:
    """SentencePiece-style (piece, log-score) pairs for a Unigram T5 tokenizer, from CLIP's BPE.

    CLIP's merges are ordered by frequency in English web captions, so the first ``num_merges``
    merged tokens are a fair English vocabulary. Each alphabetic token becomes a word-start piece
    ("▁red") when CLIP marks it as a word end (``</w>``: mostly whole words) and a continuation piece
    ("ing") in every case; single printable ASCII characters (cased, as T5 is) cover any remaining
    text. Scores fall with the merge rank and single characters score lowest, so Viterbi
    segmentation prefers whole words, then frequent pieces. Layout as T5's: <pad>, </s>, <unk>.
    """
    import math
    import string

    pieces: dict[str, float] = {}
    for rank, merge in enumerate(clip_bpe_merges(num_merges)):
        token = merge.replace(" ", "")
        word_end = token.endswith("</w>")
        token = token.removesuffix("</w>")
        if not (token.isascii() and token.isalpha()):
            continue
        score = -math.log(rank + 10.0)  # a Zipf-like log-probability: frequent merges score higher
        if word_end:
            pieces.setdefault("▁" + token, score)
        pieces.setdefault(token, score - 1.0)
    floor = -math.log(num_merges + 10.0) - 4.0
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault("▁" + char, floor)
        pieces.setdefault(char, floor - 1.0)
    pieces.setdefault("▁", floor)
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(pieces.items())


def build_t5_tokenizer(num_merges: int = 8000, model_max_length: int = 256):
    """A ``transformers.T5TokenizerFast`` (Unigram, no sentinel tokens) over :func:`t5_vocabulary`.

    No SentencePiece model file is needed: the tokenizer lives in its ``tokenizer.json`` and
    round-trips ``save_pretrained`` / ``from_pretrained``. Text is kept cased and unnormalised;
    a character outside printable ASCII becomes <unk>.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocabulary(num_merges), extra_ids=0, model_max_length=model_max_length)
