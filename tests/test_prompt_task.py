"""The prompt optimizer's offline task: user-style shape requests with recorded meanings (disjoint
train / held-out vocabularies), the meaning-based faithfulness reward against hand-made images,
and the multi-round Sem-DPO loop's resume on the tiny LM."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from diffpo.data.shape_requests import HELDOUT, SET_SEEDS, SET_SIZES, SPLITS, TRAIN, generate_requests, load_requests
from diffpo.data.shapes import COLOURS, SHAPES, ShapeSpec, draw_shape_at


def _phrases(vocab) -> set[str]:
    """Every synonym, template, background phrase and adjective of a vocabulary (plain colour names excluded)."""
    words = {s for options in vocab.colours.values() for s in options} - set(COLOURS)
    words |= {s for options in vocab.shapes.values() for s in options}
    return words | set(vocab.templates) | set(vocab.backgrounds) | set(vocab.adjectives)


def test_train_and_heldout_vocabularies_are_disjoint():
    assert _phrases(TRAIN) & _phrases(HELDOUT) == set()
    for vocab in (TRAIN, HELDOUT):
        assert set(vocab.colours) == set(COLOURS) and set(vocab.shapes) == set(SHAPES)
    # no held-out synonym (colour or shape) occurs inside a train one, or the other way round
    train_terms = {s for o in (*TRAIN.colours.values(), *TRAIN.shapes.values()) for s in o} - set(COLOURS)
    heldout_terms = {s for o in (*HELDOUT.colours.values(), *HELDOUT.shapes.values()) for s in o} - set(COLOURS)
    assert not any(a in b or b in a for a in train_terms for b in heldout_terms)


def test_shipped_sets_are_the_seeded_generator_output():
    for split in SPLITS:
        shipped = load_requests(split)
        assert shipped == generate_requests(split, SET_SIZES[split], SET_SEEDS[split])
        assert len({r.prompt for r in shipped}) == len(shipped)
    assert {r.prompt for r in load_requests("train")}.isdisjoint(r.prompt for r in load_requests("heldout"))
    assert generate_requests("train", 20, seed=5) != generate_requests("train", 20, seed=6)


def test_every_request_says_its_recorded_meaning_in_its_own_vocabulary():
    """Without typos, a request names its shape colour, shape and background colour with words of
    its split (or the plain colour name), and uses no word of the other split."""
    for split, vocab, other in (("train", TRAIN, HELDOUT), ("heldout", HELDOUT, TRAIN)):
        for request in generate_requests(split, 150, seed=3, typo_rate=0.0):
            text = request.prompt
            assert request.colour != request.background and request.shape in SHAPES
            assert request.caption == f"a {request.colour} {request.shape} on a {request.background} background"
            assert any(s in text for s in vocab.shapes[request.shape])
            for colour in (request.colour, request.background):
                assert any(re.search(rf"\b{re.escape(s)}\b", text) for s in (*vocab.colours[colour], colour))
            for phrase in {s for o in (*other.colours.values(), *other.shapes.values()) for s in o} - set(COLOURS):
                assert not re.search(rf"\b{re.escape(phrase)}\b", text), (text, phrase)


def test_typos_and_chatter_make_requests_unlike_captions():
    requests = load_requests("heldout")
    assert sum(r.prompt == r.caption for r in requests) == 0
    clean = {r.prompt for r in generate_requests("heldout", SET_SIZES["heldout"], SET_SEEDS["heldout"], typo_rate=0.0)}
    assert 0.1 < np.mean([r.prompt not in clean for r in requests]) < 0.4  # ~25% carry a typo
    with pytest.raises(ValueError, match="split"):
        generate_requests("test", 3)


# --- meaning-match: faithfulness to the recorded meaning ----------------------------------------------


def _image(shape, colour, background, cx=16.0, cy=16.0, half=8.0):
    array = np.asarray(draw_shape_at(ShapeSpec(shape, colour, background), 32, cx, cy, half))
    return torch.tensor(array).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def meaning():
    from diffpo.rewards import load

    return load("meaning-match")


def test_meaning_match_on_hand_made_images(meaning):
    caption = "a red circle on a blue background"
    cases = {  # image -> expected score, by hand: ½ colour-match + ½ [shape right]
        "right": (_image("circle", "red", "blue"), 1.0),
        "wrong shape": (_image("square", "red", "blue"), 0.5),
        "wrong shape colour": (_image("circle", "green", "blue"), 0.0),  # f_S = 0: no shape of colour S
        "colours swapped": (_image("circle", "blue", "red"), 0.5),  # colour-match 1 (both colours), no shape
    }
    images = torch.stack([image for image, _ in cases.values()])
    scores = meaning(images, [caption] * len(cases))
    assert scores[0].item() == pytest.approx(1.0) and scores[1].item() == pytest.approx(0.5)
    assert scores[2].item() == pytest.approx(0.0)
    assert scores[3].item() == pytest.approx(0.5)
    # the strict form gates colours by the shape: only the right meaning scores
    from diffpo.rewards import load

    strict = load("meaning-match-strict")(images, [caption] * len(cases))
    assert strict.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert torch.isnan(meaning(images[:1], ["please draw a crimson ball"])).all()  # not a caption: no opinion


@pytest.mark.parametrize("shape", SHAPES)
def test_meaning_match_recognises_every_shape_at_any_place_and_size(meaning, shape):
    rng = np.random.default_rng(0)
    for _ in range(10):
        half = float(rng.uniform(5.6, 10.4))
        cx, cy = rng.uniform(half + 1, 31 - half, size=2)
        image = _image(shape, "yellow", "black", cx, cy, half)[None]
        for asked in SHAPES:
            score = meaning(image, [f"a yellow {asked} on a black background"]).item()
            assert score == pytest.approx(1.0 if asked == shape else 0.5), (shape, asked, half)


def test_meaning_match_gives_noise_no_shape(meaning):
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (meaning(noise, ["a red circle on a blue background"] * 4) < 0.2).all()


# --- the multi-round loop ------------------------------------------------------------------------------


def _round_setup(tmp_path):
    from diffpo.config import from_dict
    from diffpo.prompt.config import PromptTrainConfig
    from diffpo.prompt.pairs import PairBuildOptions, RewardSpec, load_heads, load_pipeline
    from diffpo.prompt.shapes_task import SHAPES_TEMPLATE

    options = PairBuildOptions(n_candidates=3, max_new_tokens=6, seeds_per_prompt=1, steps=2, seed=0,
                               rewards=[RewardSpec("brightness", 1.0)])
    train = from_dict(PromptTrainConfig, {"rewriter": {"model": "tiny", "instruction": SHAPES_TEMPLATE.instruction},
                                          "train_batch_size": 2, "max_steps": 2, "progress_bar": False,
                                          "alpha": 1.0, "optim": {"lr": 1e-2}, "lora": {"rank": 2},
                                          "checkpoint_every": 1})

    class Embedder:  # cos from character counts: deterministic and cheap
        def encode(self, texts):
            vectors = torch.tensor([[len(t) + 1.0, t.count("a") + 1.0] for t in texts])
            return vectors / vectors.norm(dim=-1, keepdim=True)

    rounds = [["please draw a crimson ball over navy", "lime box, ivory bg"], ["a ruby wedge against a cobalt backdrop"]]
    return SHAPES_TEMPLATE, rounds, load_pipeline("tiny"), load_heads(options.rewards), Embedder(), options, train


@pytest.mark.usefixtures("single_thread")
def test_rounds_resume_finishes_what_an_uninterrupted_run_does(tmp_path):
    from diffpo.prompt.rounds import round_dir, run_rounds

    template, rounds, pipeline, heads, embedder, options, train = _round_setup(tmp_path)
    straight = run_rounds("tiny", template, rounds, pipeline, heads, embedder, tmp_path / "straight", options, train,
                          progress=False)
    assert straight == round_dir(tmp_path / "straight", 1) / "train" / "final"
    meta = json.loads((straight / "diffpo_rewriter.json").read_text())
    assert meta["base"] == str((round_dir(tmp_path / "straight", 0) / "train" / "final").resolve())  # round 1 starts from round 0

    # interrupted: round 0 done, round 1 stopped after its first prompt's candidates and one checkpoint
    resumed_dir = tmp_path / "resumed"
    run_rounds("tiny", template, rounds[:1], pipeline, heads, embedder, resumed_dir, options, train, progress=False)
    round0 = round_dir(resumed_dir, 0)
    stamp = (round0 / "candidates.jsonl").stat().st_mtime_ns
    resumed = run_rounds("tiny", template, rounds, pipeline, heads, embedder, resumed_dir, options, train,
                         progress=False)
    assert (round0 / "candidates.jsonl").stat().st_mtime_ns == stamp  # the finished round was not redone
    for index in (0, 1):
        a, b = round_dir(tmp_path / "straight", index), round_dir(resumed_dir, index)
        assert (a / "candidates.jsonl").read_text() == (b / "candidates.jsonl").read_text()
        assert (a / "pairs.jsonl").read_text() == (b / "pairs.jsonl").read_text()
    from safetensors.torch import load_file

    def same_adapter(a, b):
        first, second = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
        return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    assert same_adapter(straight, resumed)

    # interrupted inside round 1: one prompt's candidates written, training stopped after step 1
    import shutil

    round1 = round_dir(resumed_dir, 1)
    shutil.rmtree(round1 / "train" / "final")
    checkpoints = sorted((round1 / "train" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints][-1].endswith("2")
    shutil.rmtree(checkpoints[-1])
    (round1 / "pairs.jsonl").unlink()
    assert run_rounds("tiny", template, rounds, pipeline, heads, embedder, resumed_dir, options, train,
                      progress=False) == resumed
    assert same_adapter(straight, resumed)


# --- SFT warm start ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("single_thread")
def test_sft_loss_is_the_mean_completion_nll_and_training_lowers_it(tmp_path):
    from diffpo.prompt.lm import build_tiny_lm, completion_batch, load_rewriter, render_inputs, sequence_logprobs
    from diffpo.prompt.sft import sft_loss, train_sft
    from diffpo.prompt.shapes_task import SHAPES_TEMPLATE, sft_examples

    model, tokenizer = build_tiny_lm(0)
    examples = sft_examples(load_requests("train", 4))
    inputs = render_inputs(tokenizer, [p for p, _ in examples], SHAPES_TEMPLATE)
    batch = completion_batch(tokenizer, inputs, [t for _, t in examples])
    with torch.no_grad():
        total = -sequence_logprobs(model, **batch).sum()
    tokens = batch["completion_mask"][:, 1:].sum()
    assert sft_loss(model, batch).item() == pytest.approx((total / tokens).item(), rel=1e-5)

    final = train_sft("tiny", SHAPES_TEMPLATE, examples, tmp_path / "sft", steps=8, batch_size=4, lr=1e-2,
                      progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]
    trained, _ = load_rewriter(str(final))  # the adapter merged into the base
    with torch.no_grad():
        assert sft_loss(trained, batch).item() < sft_loss(model, batch).item()
    meta = json.loads((final / "diffpo_rewriter.json").read_text())
    assert meta["method"] == "sft" and meta["template"]["instruction"] == SHAPES_TEMPLATE.instruction
    assert train_sft("tiny", SHAPES_TEMPLATE, examples, tmp_path / "sft", steps=8) == final  # done: kept
