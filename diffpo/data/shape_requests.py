"""User-style requests for the shapes world: the source prompts of the prompt optimizer's task.

The bundled tiny model only understands captions of one form, "a red circle on a blue
background". People do not write like that: they say "please draw a crimson ball against a navy
backdrop", "scarlet orb, pitch-black bg", or make typos. Each request generated here records the
meaning it stands for (shape, shape colour, background colour), so a rewrite is judged by whether
its image shows that meaning, not by its wording.

Train and held-out requests come from **disjoint vocabularies**: disjoint colour synonyms, shape
nouns, sentence templates, background phrases and adjectives (the plain colour names "red", "blue",
... are the only shared words, drawn in a minority of requests). A rewriter therefore cannot pass
the held-out set by memorising train phrasings; it has to map words it never saw in training to the
caption language. Generation is seeded; the shipped sets in ``diffpo/assets/prompts/shape-requests``
are ``write_sets()`` of the defaults (``python -m diffpo.data.shape_requests OUT_DIR`` rewrites them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from diffpo.data.shapes import COLOURS, SHAPES, ShapeSpec

SPLITS = ("train", "heldout")
SET_SIZES = {"train": 240, "heldout": 120}
SET_SEEDS = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class Vocabulary:
    """The words and sentence frames of one split. Templates use {c} (shape colour phrase), {s}
    (shape noun), {bg} (background phrase, built from a background template and {b}, the
    background colour phrase) and {adj} (an optional adjective followed by a space, or nothing)."""

    colours: dict[str, tuple[str, ...]]
    shapes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]
    backgrounds: tuple[str, ...]
    adjectives: tuple[str, ...]


TRAIN = Vocabulary(
    colours={"red": ("crimson", "cherry red", "ruby"), "green": ("emerald", "lime", "grass green"),
             "blue": ("navy", "cobalt", "sky blue"), "yellow": ("golden", "lemon", "canary yellow"),
             "white": ("snow white", "ivory", "milky white"), "black": ("jet black", "ebony", "coal black")},
    shapes={"circle": ("ball", "disc", "round dot"), "square": ("box", "block", "square"),
            "triangle": ("wedge", "three-sided shape", "triangle")},
    templates=("please draw a {adj}{c} {s} {bg}", "I'd like a {adj}{c} {s} {bg}", "{c} {s}, {b} bg",
               "can you make a {adj}{s} that is {c}, {bg}", "a {adj}{s} in {c} {bg} please"),
    backgrounds=("on a {b} background", "over {b}", "against a {b} backdrop"),
    adjectives=("big", "small", "shiny", "cute", "bold"),
)
HELDOUT = Vocabulary(
    colours={"red": ("scarlet", "tomato red", "blood red"), "green": ("jade", "forest green", "leaf green"),
             "blue": ("azure", "sapphire", "royal blue"), "yellow": ("sunflower yellow", "mustard", "butter yellow"),
             "white": ("pearl white", "chalk white", "pure white"), "black": ("pitch black", "onyx", "inky black")},
    shapes={"circle": ("orb", "sphere", "round blob"), "square": ("tile", "cube", "slab"),
            "triangle": ("pyramid", "arrowhead", "triangular shape")},
    templates=("could you render a {adj}{c} {s} {bg}", "I want to see a {adj}{s} coloured {c} {bg}",
               "{b} scene with a {c} {s} in the middle", "show me a picture of a {adj}{c} {s} {bg}",
               "generate: {c} {s}; {bg}"),
    backgrounds=("with a {b} backdrop behind it", "set on {b}", "in front of a {b} wall", "surrounded by {b}"),
    adjectives=("large", "tiny", "glossy", "simple", "neat"),
)
VOCABULARIES = {"train": TRAIN, "heldout": HELDOUT}


@dataclass(frozen=True)
class ShapeRequest:
    """A user's request and the meaning it stands for."""

    prompt: str
    shape: str
    colour: str
    background: str

    @property
    def spec(self) -> ShapeSpec:
        return ShapeSpec(self.shape, self.colour, self.background)

    @property
    def caption(self) -> str:
        """The meaning in the caption language the tiny model was trained on."""
        return self.spec.caption


def _typo(word: str, rng: np.random.Generator) -> str:
    """One keyboard slip in ``word``: a dropped, doubled or swapped letter (words of 4+ letters)."""
    if len(word) < 4 or not word.isalpha():
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1:]
    if kind == 1:
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def generate_requests(split: str, count: int, seed: int = 0, plain_colour_rate: float = 0.2,
                      adjective_rate: float = 0.4, typo_rate: float = 0.25) -> list[ShapeRequest]:
    """``count`` distinct requests of ``split`` ("train" or "heldout"), reproducible from ``seed``.

    Meanings are drawn uniformly over every (shape, colour, background) with distinct colours; each
    colour is named by a synonym of the split, or by its plain name with ``plain_colour_rate``; an
    adjective is added with ``adjective_rate`` and one word gets a typo with ``typo_rate``."""
    if split not in VOCABULARIES:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    vocab = VOCABULARIES[split]
    specs = [ShapeSpec(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]
    rng = np.random.default_rng(seed)
    slips = np.random.default_rng([seed, 1])  # typos draw from their own stream: the phrasing is the same without them
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    requests, seen = [], set()
    for _ in range(count * 50):
        if len(requests) == count:
            break
        spec = specs[int(rng.integers(len(specs)))]
        colour = spec.colour if rng.random() < plain_colour_rate else pick(vocab.colours[spec.colour])
        back = spec.background if rng.random() < plain_colour_rate else pick(vocab.colours[spec.background])
        adjective = f"{pick(vocab.adjectives)} " if rng.random() < adjective_rate else ""
        background = pick(vocab.backgrounds).format(b=back)
        text = pick(vocab.templates).format(c=colour, s=pick(vocab.shapes[spec.shape]), b=back, bg=background,
                                            adj=adjective)
        if slips.random() < typo_rate:
            words = text.split(" ")
            j = int(slips.integers(len(words)))
            words[j] = _typo(words[j], slips)
            text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        requests.append(ShapeRequest(text, spec.shape, spec.colour, spec.background))
    if len(requests) < count:
        raise ValueError(f"only {len(requests)} distinct {split} requests could be drawn, not {count}: ask for fewer")
    return requests


def write_sets(out_dir: str | Path, sizes: dict[str, int] | None = None, seeds: dict[str, int] | None = None
               ) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (one request per line: prompt, shape, colour,
    background, caption) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        rows = generate_requests(split, (sizes or SET_SIZES)[split], (seeds or SET_SEEDS)[split])
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({**asdict(r), "caption": r.caption}) + "\n" for r in rows))
    return paths


def load_requests(split: str, count: int | None = None) -> list[ShapeRequest]:
    """The shipped ``split`` set (``diffpo/assets/prompts/shape-requests/{split}.jsonl``), or its first ``count``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    path = resources.files("diffpo") / "assets" / "prompts" / "shape-requests" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    requests = [ShapeRequest(r["prompt"], r["shape"], r["colour"], r["background"]) for r in rows]
    if count is not None:
        if not 1 <= count <= len(requests):
            raise ValueError(f"count={count} must be in 1..{len(requests)} (the {split} set's size)")
        requests = requests[:count]
    return requests


if __name__ == "__main__":
    import sys

    for name, written in write_sets(sys.argv[1] if len(sys.argv) > 1 else "diffpo/assets/prompts/shape-requests").items():
        print(name, written)
