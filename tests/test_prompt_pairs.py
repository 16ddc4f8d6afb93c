"""Prompt-rewrite preference data and rewriter evaluation on the tiny LM and the bundled tiny
diffusion model (2 DDIM steps, programmatic reward heads, a bag-of-characters embedder)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffpo.prompt.pairs import PairBuildOptions, RewardSpec, build_candidates, make_pairs, pairs_of, prompt_seeds

K, S, STEPS = 3, 2, 2


class CharEmbedder:
    """Unit-norm letter-count vectors: a cheap stand-in for the sentence embedder."""

    def encode(self, texts):
        vectors = torch.zeros(len(texts), 27)
        for i, text in enumerate(texts):
            for ch in text.lower():
                vectors[i, ord(ch) - 97 if "a" <= ch <= "z" else 26] += 1
        vectors[:, 26] += 1e-3  # empty texts still get a unit vector
        return vectors / vectors.norm(dim=1, keepdim=True)


class CountingPipeline:
    """Delegates to a pipeline and records every prompt it renders."""

    def __init__(self, pipe):
        self.pipe, self.rendered = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompt, **kwargs):
        self.rendered.extend(prompt)
        return self.pipe(prompt=prompt, **kwargs)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny LM ops: threads only spin


@pytest.fixture(scope="module")
def pipe():
    from diffpo.models.loading import load_stack

    pipeline = load_stack("tiny").pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def rewriter():
    from diffpo.prompt.lm import load_rewriter

    return load_rewriter("tiny")


@pytest.fixture(scope="module")
def heads():
    from diffpo.rewards import load

    return {"jpeg-compressibility": (load("jpeg-compressibility"), 0.5, "rewrite"),
            "colour-match": (load("colour-match"), 2.0, "original")}


@pytest.fixture(scope="module")
def captions():
    from diffpo.data.shapes import shape_captions

    return shape_captions(3, seed=0)


def _options(**changes):
    return PairBuildOptions(**{"n_candidates": K, "seeds_per_prompt": S, "steps": STEPS, "max_new_tokens": 12,
                               "render_batch_size": 8, **changes})


@pytest.fixture(scope="module")
def built(tmp_path_factory, pipe, rewriter, heads, captions):
    """Candidates for 2 captions, then a rerun for all 3 (counting renders), and a fresh 3-caption run."""
    from diffpo.prompt.lm import RewriteTemplate

    root = tmp_path_factory.mktemp("candidates")
    path = root / "candidates.jsonl"
    build_candidates(rewriter, RewriteTemplate(), captions[:2], pipe, heads, CharEmbedder(), path, _options(),
                     progress=False)
    first = path.read_text().splitlines()
    counting = CountingPipeline(pipe)
    build_candidates(rewriter, RewriteTemplate(), captions, counting, heads, CharEmbedder(), path, _options(),
                     progress=False)
    fresh = build_candidates(rewriter, RewriteTemplate(), captions, pipe, heads, CharEmbedder(),
                             root / "fresh.jsonl", _options(), progress=False)
    return {"path": path, "first": first, "rendered": counting.rendered, "fresh": fresh}


def test_candidates_file_holds_k_scored_rewrites_per_prompt(built, heads, captions):
    records = [json.loads(line) for line in built["path"].read_text().splitlines()]
    assert [r["prompt"] for r in records] == captions
    for r in records:
        assert len(r["candidates"]) == len(r["rewards"]) == len(r["cos"]) == K
        assert set(r["components"]) == set(heads) and all(len(v) == K for v in r["components"].values())
        assert r["seeds"] == prompt_seeds(r["prompt"], S)
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in r["cos"])
        for i in range(K):  # combined = sum of weight x head score (means over seeds)
            expected = sum(w * r["components"][key][i] for key, (_, w, _) in heads.items())
            assert r["rewards"][i] == pytest.approx(expected, abs=1e-9)
        expected = sum(w * r["original_components"][key] for key, (_, w, _) in heads.items())
        assert r["original_reward"] == pytest.approx(expected, abs=1e-9)
        assert math.isfinite(r["original_reward"])


def test_rerun_resumes_without_recomputing(built, captions):
    lines = built["path"].read_text().splitlines()
    assert lines[:2] == built["first"]  # untouched
    assert len(lines) == 3
    third = json.loads(lines[2])
    # only the third caption was rendered: its K rewrites and itself, on S seeds each
    assert len(built["rendered"]) == (K + 1) * S
    assert built["rendered"] == [t for t in third["candidates"] for _ in range(S)] + [captions[2]] * S
    # and the resumed file equals an uninterrupted run: prompts are seeded by their text
    assert built["fresh"].read_text().splitlines() == lines


def test_faithfulness_head_is_scored_against_the_original(built, pipe, heads):
    from diffpo.eval.generate import generate

    record = json.loads(built["path"].read_text().splitlines()[0])
    rewrite = record["candidates"][0]
    images = generate(pipe, [rewrite] * S, record["seeds"], STEPS, 5.0)
    colour, jpeg = heads["colour-match"][0], heads["jpeg-compressibility"][0]
    with_original = colour(images, [record["prompt"]] * S).mean().item()
    assert record["components"]["colour-match"][0] == pytest.approx(with_original, abs=1e-6)
    assert torch.isnan(colour(images, [rewrite] * S)).all()  # the tiny LM's text is no shapes caption
    with_rewrite = jpeg(images, [rewrite] * S).mean().item()
    # rendered in a batch with other texts, an image can differ in the last float bits, so a pixel
    # may round the other way and the JPEG gain or lose a byte (1e-3 kB)
    assert record["components"]["jpeg-compressibility"][0] == pytest.approx(with_rewrite, abs=2e-3)
    # the original is rendered on the same seeds
    originals = generate(pipe, [record["prompt"]] * S, record["seeds"], STEPS, 5.0)
    assert record["original_components"]["colour-match"] == pytest.approx(
        colour(originals, [record["prompt"]] * S).mean().item(), abs=1e-6)


def _record(rewards, texts=None):
    texts = texts or [f"rewrite {i}" for i in range(len(rewards))]
    return {"prompt": "p", "candidates": texts, "rewards": rewards, "cos": [0.1 * i for i in range(len(rewards))],
            "components": {"h": [2 * (r or 0) for r in rewards]}, "original_reward": 0.0, "seeds": [0]}


def test_pairing_counts_by_hand(tmp_path):
    record = _record([3.0, 1.0, 2.0, 2.0])
    assert len(pairs_of(record, "best_worst")) == 1
    assert len(pairs_of(record, "all")) == 4 * 3 // 2 - 1  # the 2.0 / 2.0 tie is dropped
    assert len(pairs_of(record, "all", margin=0.5)) == 5
    assert len(pairs_of(record, "all", margin=1.0)) == 1  # only 3 vs 1 differs by more than 1
    assert pairs_of(record, "best_worst", margin=2.0) == []
    (best,) = pairs_of(record, "best_worst")
    assert (best["chosen"], best["rejected"]) == ("rewrite 0", "rewrite 1")
    assert (best["reward_chosen"], best["reward_rejected"], best["cos_chosen"], best["cos_rejected"]) == (3.0, 1.0, 0.0, 0.1)
    assert best["components_chosen"] == {"h": 6.0} and best["components_rejected"] == {"h": 2.0}
    assert all(p["reward_chosen"] > p["reward_rejected"] for p in pairs_of(record, "all"))
    # a candidate without a finite reward is never paired; identical texts are no pair
    assert len(pairs_of(_record([None, 1.0, 2.0]), "all")) == 1
    assert pairs_of(_record([1.0, 2.0], ["same", "same"]), "all") == []
    path = tmp_path / "candidates.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (record, _record([1.0, 1.0]))) + "\n")
    assert make_pairs(path, tmp_path / "pairs.jsonl", "all") == 5
    assert make_pairs(path, tmp_path / "pairs.jsonl", "best_worst") == 1
    lines = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "cos_chosen",
                             "cos_rejected", "components_chosen", "components_rejected"}


def test_make_pairs_on_built_candidates(built, tmp_path):
    records = [json.loads(line) for line in built["path"].read_text().splitlines()]
    ties = lambda r: sum(a == b for i, a in enumerate(r["rewards"]) for b in r["rewards"][i + 1:])  # noqa: E731
    expected_all = sum(K * (K - 1) // 2 - ties(r) for r in records)
    assert make_pairs(built["path"], tmp_path / "all.jsonl", "all") == expected_all
    expected_bw = sum(max(r["rewards"]) > min(r["rewards"]) for r in records)
    assert make_pairs(built["path"], tmp_path / "bw.jsonl", "best_worst") == expected_bw
    huge = max(max(r["rewards"]) - min(r["rewards"]) for r in records)
    assert make_pairs(built["path"], tmp_path / "none.jsonl", "all", margin=huge) == 0


def test_resume_repairs_a_cut_line_and_refuses_other_options(tmp_path, pipe, rewriter, heads, captions):
    from diffpo.prompt.lm import RewriteTemplate

    path = tmp_path / "candidates.jsonl"
    options = _options(n_candidates=2)
    one = {"jpeg-compressibility": heads["jpeg-compressibility"]}
    build_candidates(rewriter, RewriteTemplate(), captions[:1], pipe, one, CharEmbedder(), path, options, progress=False)
    with open(path, "a") as handle:
        handle.write('{"prompt": "cut sho')  # a crash mid-write
    build_candidates(rewriter, RewriteTemplate(), captions[:2], pipe, one, CharEmbedder(), path, options, progress=False)
    assert [json.loads(x)["prompt"] for x in path.read_text().splitlines()] == captions[:2]
    with pytest.raises(ValueError, match="other options"):
        build_candidates(rewriter, RewriteTemplate(), captions, pipe, one, CharEmbedder(), path, _options(), progress=False)


def test_options_and_specs_are_checked():
    with pytest.raises(ValueError, match="n_candidates"):
        PairBuildOptions(n_candidates=1)
    with pytest.raises(ValueError, match="pairing"):
        PairBuildOptions(pairing="best")
    with pytest.raises(ValueError, match="against"):
        RewardSpec("clip", against="caption")
    with pytest.raises(ValueError, match="label"):
        PairBuildOptions(rewards=[RewardSpec("clip"), RewardSpec("clip", against="original")])
    defaults = PairBuildOptions().rewards  # learned heads by default; tests pass programmatic ones
    assert [(r.name, r.weight, r.against) for r in defaults] == [("aesthetic", 1.0, "rewrite"), ("clip", 1.0, "original")]


def test_evaluate_writes_json_with_cis_and_a_report(tmp_path, pipe, rewriter, heads, captions):
    from diffpo.prompt.evaluate import evaluate_rewriter
    from diffpo.prompt.lm import RewriteTemplate

    result = evaluate_rewriter(rewriter, RewriteTemplate(), captions[:2], pipe, heads, CharEmbedder(), tmp_path,
                               seeds_per_prompt=2, steps=STEPS, n=2, max_new_tokens=12, progress=False)
    saved = json.loads((tmp_path / "prompt_eval.json").read_text())
    assert saved["prompts"] == 2 and set(saved["metrics"]) == {*heads, "combined"}
    for key, entry in saved["metrics"].items():
        for model in ("original", "optimized"):
            assert entry[model]["n"] > 0 or key == "colour-match"
            assert len(entry[model]["ci95"]) == 2
        assert len(entry["win_rate"]["ci95"]) == 2
    jpeg = saved["metrics"]["jpeg-compressibility"]
    assert jpeg["original"]["ci95"][0] <= jpeg["original"]["mean"] <= jpeg["original"]["ci95"][1]
    assert saved["metrics"]["colour-match"]["against"] == "original"
    assert saved["metrics"]["colour-match"]["optimized"]["n"] == 4  # scored with the caption, not the rewrite
    sim = saved["semantic_similarity"]
    assert sim["n"] == 2 and sim["ci95"][0] <= sim["mean"] <= sim["ci95"][1]
    assert [p["original"] for p in saved["per_prompt"]] == captions[:2]
    report = tmp_path / "report"
    for name in ("index.html", "scores.json", "summary.md", "examples.html"):
        assert (report / name).is_file()
    assert "examples.html" in (report / "index.html").read_text()
    import html

    assert html.escape(saved["per_prompt"][0]["optimized"]) in (report / "examples.html").read_text()
    assert json.loads((report / "scores.json").read_text())["models"] == ["original", "optimized"]
    assert result["metrics"].keys() == saved["metrics"].keys()


def test_source_prompts(tmp_path):
    from diffpo.prompt.sources import load_source_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n a dog \na cat\n")
    assert load_source_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert load_source_prompts(str(tmp_path / "p.jsonl"), column="text") == ["x", "y"]
    shapes = load_source_prompts("shapes", max_prompts=5, seed=1)
    assert len(shapes) == 5 and shapes == load_source_prompts("shapes", max_prompts=5, seed=1)
    assert len(load_source_prompts("partiprompts", max_prompts=3)) == 3
    with pytest.raises(FileNotFoundError, match="not found"):
        load_source_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_source_prompts(str(tmp_path / "empty.txt"))


def test_pairs_and_evaluate_commands(tmp_path):
    """The CLI helpers end to end with the packaged sentence embedder; train reads the pairs."""
    import argparse

    from diffpo.prompt.cli import add_evaluate_command, add_pairs_command
    from diffpo.prompt.pairs import parse_reward
    from diffpo.prompt.train import read_pairs

    assert parse_reward("clip=0.5:original") == RewardSpec("clip", 0.5, "original")
    with pytest.raises(ValueError, match="NAME"):
        parse_reward("clip=x")
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    add_pairs_command(commands)
    add_evaluate_command(commands)
    common = ["--source", "shapes", "--max-prompts", "2", "--steps", "2", "--max-new-tokens", "8", "--no-progress",
              "--reward", "jpeg-compressibility=0.5", "--reward", "colour-match=2:original"]
    args = parser.parse_args(["pairs", "--rewriter", "tiny", "--n", "3", "--pairing", "all", "--out", str(tmp_path), *common])
    args.func(args)
    records = [json.loads(x) for x in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["candidates"]) == 3 for r in records)
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert len(pairs) == sum(3 - sum(a == b for i, a in enumerate(r["rewards"]) for b in r["rewards"][i + 1:])
                             for r in records)
    args = parser.parse_args(["evaluate", "tiny", "--out", str(tmp_path / "eval"), *common])
    args.func(args)
    assert (tmp_path / "eval" / "prompt_eval.json").is_file() and (tmp_path / "eval" / "report" / "index.html").is_file()
