"""The offline prompt-optimization task: user-style requests for the shapes world
(``diffpo.data.shape_requests``) rewritten for the bundled tiny model, whose text encoder knows
only captions like "a red circle on a blue background".

Faithfulness is measured against each request's recorded meaning: the ``meaning-match`` head is
scored with the meaning's caption (``references``), never with the user's words, so a rewrite
gains only by making the image show what the user meant. Meaning accuracy of a text is whether it
parses as a shapes caption of exactly that meaning.
"""

from __future__ import annotations

from diffpo.data.shape_requests import ShapeRequest
from diffpo.data.shapes import parse_caption
from diffpo.prompt.lm import RewriteTemplate

# Measured on SmolLM2-135M-Instruct (docs/methods.md): naming the target form and its vocabulary
# in the instruction makes the base model copy the form sometimes; the SFT warm start does the rest.
# Short on purpose: every token of the input is paid for in each SFT / DPO forward on the CPU.
SHAPES_INSTRUCTION = ("Rewrite as \"a <colour> <shape> on a <colour> background\" (colours: red, green, blue, yellow, "
                      "white, black; shapes: circle, square, triangle): {prompt}")
SHAPES_TEMPLATE = RewriteTemplate(SHAPES_INSTRUCTION, True, "You rewrite image prompts.")  # shorter than the default system turn

# The combined reward: faithfulness to the meaning plus an image-quality term (a clean render of a
# flat shape compresses well; garbled renders do not).
FAITHFULNESS = "meaning-match=1:original"
QUALITY = "jpeg-compressibility=0.25"
SHAPES_REWARDS = (FAITHFULNESS, QUALITY)


def references(requests: list[ShapeRequest]) -> dict[str, str]:
    """{request prompt: caption of its meaning}: what faithfulness heads score against."""
    return {r.prompt: r.caption for r in requests}


def sft_examples(requests: list[ShapeRequest]) -> list[tuple[str, str]]:
    """Canonical rewrites (request, caption of its meaning) for the SFT warm start."""
    return [(r.prompt, r.caption) for r in requests]


def meaning_correct(text: str, request: ShapeRequest) -> bool:
    """Does ``text`` state exactly the request's meaning in the caption language?"""
    spec = parse_caption(text.strip().rstrip("."))
    return spec is not None and spec == request.spec
