"""``diffpo eval``: seeds and shared noise, statistics against hand-computed values, resuming,
per-category breakdown, prompt sets, config validation, the report files and the video path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpo.config import ConfigError, from_dict
from diffpo.eval.config import EvalConfig, PromptSetConfig, load_eval_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))


def small_config(out, **extra) -> EvalConfig:
    """Two entries of the bundled model (DDIM vs Euler), 4 shapes prompts x 2 images, 3 steps."""
    data = {"output_dir": str(out), "progress_bar": False,
            "models": [{"name": "base", "pretrained": "tiny"},
                       {"name": "euler", "pretrained": "tiny", "sampling": {"scheduler": "euler"}}],
            "prompts": {"source": "shapes", "max_prompts": 4, "subsample_seed": 1},
            "sampling": {"steps": 3, "images_per_prompt": 2, "batch_size": 8},
            "rewards": [{"name": "colour-match"}, {"name": "jpeg-compressibility"}],
            "report": {"bootstrap_resamples": 200, "grid_prompts": 3, "top_k": 2}}
    data.update(extra)
    return from_dict(EvalConfig, data)


# --------------------------------------------------------------------------------------------
# seeds and noise
# --------------------------------------------------------------------------------------------


def test_seed_formula_depends_only_on_prompt_row_and_image_index():
    from diffpo.eval.generate import plan_samples, sample_seed
    from diffpo.eval.prompts import PromptRecord

    assert sample_seed(0, 3, 1) == 3001
    assert sample_seed(2, 0, 0) == 20_000_000
    records = [PromptRecord(7, "a"), PromptRecord(12, "b")]
    a = plan_samples("m1", "samples/m1", records, 2, seed=0)
    b = plan_samples("m2", "samples/m2", records, 2, seed=0)
    assert [s.seed for s in a] == [7000, 7001, 12000, 12001] == [s.seed for s in b]
    assert a[1].file == "samples/m1/p00007_i001.png"


def test_same_seeds_same_images_and_identical_noise_across_models(tiny_sd_dir):
    from diffpo.eval.backends import DiffusersBackend
    from diffpo.eval.config import EvalModelConfig, SamplingConfig
    from diffpo.eval.generate import initial_latents

    sampling = SamplingConfig(steps=3, eta=0.5)
    bundled = DiffusersBackend(EvalModelConfig(name="a", pretrained="tiny"), sampling)
    random = DiffusersBackend(EvalModelConfig(name="b", pretrained=tiny_sd_dir), sampling)
    seeds = [11, 12, 13]
    noise_a, _ = bundled.initial_noise(seeds)
    noise_b, _ = random.initial_noise(seeds)
    assert bundled.latent_shape == random.latent_shape
    assert torch.equal(noise_a, noise_b)
    assert torch.equal(noise_a, initial_latents(seeds, bundled.latent_shape))
    prompts = ["a red circle on a blue background", "a green square on a white background", "a black triangle on a yellow background"]
    first, again = bundled.generate(prompts, seeds), bundled.generate(prompts, seeds)
    assert first.shape == (3, 3, 32, 32)
    assert torch.equal(first, again)
    # per-sample generators: an image does not depend on the batch it is generated in (eta noise too)
    alone = bundled.generate(prompts[1:2], seeds[1:2])
    assert torch.allclose(alone[0], first[1], atol=1e-4)
    assert not torch.allclose(first[0], first[1])


def test_run_dir_with_a_fresh_lora_reproduces_the_base_model(tmp_path):
    """A diffpo run dir (final/ LoRA + diffpo.json) loads; LoRA B = 0 so the images equal the base's."""
    from diffpo.eval.backends import DiffusersBackend, resolve_model
    from diffpo.eval.config import EvalModelConfig, SamplingConfig
    from diffpo.models.loading import load_stack
    from diffpo.models.lora import attach_lora, export_lora

    stack = load_stack("tiny")
    attach_lora(stack.unet, 4, None, 0.0, ["to_q", "to_v"])
    export_lora(stack.unet, stack.family.pipeline_class, tmp_path / "run" / "final")
    (tmp_path / "run" / "final" / "diffpo.json").write_text(json.dumps({"base_model": stack.source}))
    entry = EvalModelConfig(name="run", run_dir=str(tmp_path / "run"))
    assert resolve_model(entry).lora == str(tmp_path / "run" / "final")
    sampling = SamplingConfig(steps=2)
    prompts, seeds = ["a red circle on a blue background"], [5]
    tuned = DiffusersBackend(entry, sampling).generate(prompts, seeds)
    base = DiffusersBackend(EvalModelConfig(name="base"), sampling).generate(prompts, seeds)
    assert torch.allclose(tuned, base, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no final/diffpo.json"):
        resolve_model(EvalModelConfig(name="x", run_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# statistics, by hand
# --------------------------------------------------------------------------------------------


def test_win_rate_and_tie_rule_by_hand():
    from diffpo.eval.stats import win_outcomes, win_rate

    candidate = [3.0, 2.0, 1.0, 5.0, 1.05, np.nan]
    baseline = [1.0, 2.0, 2.0, 4.0, 1.0, 0.0]
    assert win_outcomes(candidate, baseline)[:5].tolist() == [1.0, 0.5, 0.0, 1.0, 1.0]
    result = win_rate(candidate, baseline)
    # wins 3, ties 1, losses 1 over 5 finite pairs: (3 + 0.5) / 5
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (3, 1, 1, 5)
    assert result["mean"] == pytest.approx(0.7)
    assert "counts 1/2" in result["tie_rule"]
    # with a tolerance of 0.1 the 1.05 vs 1.0 pair becomes a tie: (2 + 1) / 5
    loose = win_rate(candidate, baseline, tie_tolerance=0.1)
    assert (loose["wins"], loose["ties"], loose["losses"]) == (2, 2, 1)
    assert loose["mean"] == pytest.approx(0.6)
    assert win_rate([1, 1, 1], [0, 0, 0])["ci95"] == [1.0, 1.0]


def test_bootstrap_intervals_by_hand():
    from diffpo.eval.stats import describe, summarize, win_rate

    # two values {0, 1}: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1
    assert describe([0.0, 1.0], resamples=4000)["ci95"] == [0.0, 1.0]
    # n = 400 outcomes at p = 0.75: the bootstrap CI is close to the normal one, 0.75 +- 1.96 * sqrt(p(1-p)/n)
    outcomes = np.r_[np.ones(300), np.zeros(100)]
    low, high = win_rate(outcomes, np.full(400, 0.5))["ci95"]
    half = 1.96 * math.sqrt(0.75 * 0.25 / 400)
    assert low == pytest.approx(0.75 - half, abs=0.01) and high == pytest.approx(0.75 + half, abs=0.01)
    # cluster bootstrap: two prompts, one all wins and one all losses: resampling prompts gives
    # means 0, 1/2, 1 (CI [0, 1]); resampling images would wrongly give a narrow interval
    wins = np.r_[np.ones(50), np.zeros(50)]
    groups = np.r_[np.zeros(50), np.ones(50)]
    assert win_rate(wins, np.full(100, 0.5), groups=groups, resamples=4000)["ci95"] == [0.0, 1.0]
    assert win_rate(wins, np.full(100, 0.5))["ci95"][1] < 0.7
    # median, std (ddof=1), n; NaN left out; without groups the mean CI is summarize's
    values = [1.0, 2.0, 4.0, np.nan, 10.0]
    stats = describe(values)
    assert (stats["mean"], stats["median"], stats["n"]) == (4.25, 3.0, 4)
    assert stats["std"] == pytest.approx(math.sqrt(((1 - 4.25) ** 2 + (2 - 4.25) ** 2 + (4 - 4.25) ** 2 + (10 - 4.25) ** 2) / 3))
    assert stats["ci95"] == summarize(values)["ci95"]
    # equal groups and unequal groups give the same median replicates path results as a loop
    grouped = describe([1.0, 2.0, 3.0, 4.0, 5.0], groups=[0, 0, 1, 1, 2], resamples=300)
    assert grouped["median_ci95"][0] <= 3.0 <= grouped["median_ci95"][1]


def test_per_category_breakdown_and_prompt_deltas():
    from diffpo.eval.comparison import StatsOptions, compare, prompt_deltas

    def row(model, p, k, category, score):
        return {"model": model, "prompt_index": p, "image_index": k, "prompt": f"prompt {p}", "category": category,
                "file": f"{model}/{p}_{k}.png", "seed": p * 1000 + k, "r": score}

    rows = [row("base", 0, 0, "cat", 1.0), row("base", 0, 1, "cat", 2.0), row("base", 1, 0, "dog", 5.0),
            row("new", 0, 0, "cat", 2.0), row("new", 0, 1, "cat", 2.0), row("new", 1, 0, "dog", 4.0)]
    result = compare(rows, ["base", "new"], ["r"], StatsOptions(resamples=200))
    assert result["categories"] == ["cat", "dog"]
    assert result["by_category"]["r"]["cat"]["base"]["mean"] == 1.5
    assert result["by_category"]["r"]["cat"]["new"]["mean"] == 2.0
    assert result["by_category"]["r"]["dog"]["new"]["n"] == 1
    cat = result["category_win_rates"]["r"]["cat"]["new"]
    assert (cat["wins"], cat["ties"], cat["losses"], cat["mean"]) == (1, 1, 0, 0.75)
    assert result["category_win_rates"]["r"]["dog"]["new"]["mean"] == 0.0
    overall = result["win_rates"]["r"]["new"]
    assert overall["mean"] == pytest.approx(1.5 / 3)
    deltas = prompt_deltas(rows, "base", "new", "r")
    assert [(d["prompt_index"], d["delta"]) for d in deltas] == [(1, -1.0), (0, 0.5)]


# --------------------------------------------------------------------------------------------
# prompt sets
# --------------------------------------------------------------------------------------------


def test_prompt_sets_tsv_txt_jsonl_and_subsampling(tmp_path):
    from diffpo.eval.prompts import load_prompts

    parti = load_prompts(PromptSetConfig(source="partiprompts"))
    assert len(parti) == 1632
    assert (parti[0].prompt, parti[0].category) == ("bond", "Abstract")
    assert len({p.category for p in parti}) == 12
    assert (Path(__file__).resolve().parents[1] / "assets/prompts/partiprompts/LICENSE").is_file()
    animals = load_prompts(PromptSetConfig(source="partiprompts", categories=["Animals"]))
    assert len(animals) == 314 and {p.category for p in animals} == {"Animals"}

    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\na cat\tanimal\na car\tvehicle\n")
    assert [(p.index, p.prompt, p.category) for p in load_prompts(PromptSetConfig(source=str(tsv)))] == \
        [(0, "a cat", "animal"), (1, "a car", "vehicle")]
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\nthird\n")
    assert [p.prompt for p in load_prompts(PromptSetConfig(source=str(txt)))] == ["first", "second", "third"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "category": "a"}\n{"prompt": "y"}\n')
    assert [(p.prompt, p.category) for p in load_prompts(PromptSetConfig(source=str(jsonl)))] == [("x", "a"), ("y", None)]

    shapes = load_prompts(PromptSetConfig(source="shapes"))
    assert len(shapes) == 90 and shapes[0].category == "circle"
    sub = load_prompts(PromptSetConfig(source="partiprompts", max_prompts=20, subsample_seed=3))
    assert sub == load_prompts(PromptSetConfig(source="partiprompts", max_prompts=20, subsample_seed=3))
    assert sub != load_prompts(PromptSetConfig(source="partiprompts", max_prompts=20, subsample_seed=4))
    assert [p.index for p in sub] == sorted(p.index for p in sub)  # original order, original rows (seeds)
    assert all(parti[p.index] == p for p in sub)

    with pytest.raises(FileNotFoundError, match="prompt file"):
        load_prompts(PromptSetConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="no 'text' column"):
        load_prompts(PromptSetConfig(source=str(jsonl), prompt_column="text"))
    with pytest.raises(ValueError, match="not in the prompt set"):
        load_prompts(PromptSetConfig(source=str(tsv), categories=["plant"]))


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_eval_config_validates(path):
    config = load_eval_config(path)
    assert config.models and config.rewards


def test_config_errors_name_the_key(tmp_path):
    from diffpo.eval.backends import SCHEDULER_CLASSES
    from diffpo.eval.config import SCHEDULERS

    assert set(SCHEDULERS) == set(SCHEDULER_CLASSES) | {"auto"}  # auto: the model family's own sampler
    tiny = [p for p in CONFIGS if p.name == "tiny.yaml"][0]
    with pytest.raises(ConfigError, match="unknown config key 'sampling.stepz'; did you mean 'steps'"):
        load_eval_config(tiny, ["sampling.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'models\[0\].lorra'"):
        load_eval_config(tiny, ["models.0.lorra=x"])
    with pytest.raises(ConfigError, match="reward 'clipp' is unknown; did you mean 'clip'"):
        load_eval_config(tiny, ["rewards.0.name=clipp"])
    with pytest.raises(ConfigError, match="model 'x': sampling override scheduler='eulr'"):
        small_config(tmp_path, models=[{"name": "x", "sampling": {"scheduler": "eulr"}}])
    with pytest.raises(ConfigError, match="distinct"):
        small_config(tmp_path, models=[{"name": "a"}, {"name": "A"}])
    with pytest.raises(ConfigError, match="models is empty"):
        small_config(tmp_path, models=[])
    # list positions in overrides: change an entry, append one
    config = load_eval_config(tiny, ["models.1.lora=/some/lora", "rewards.2.name=brightness", "output_dir=/tmp/x"])
    assert config.models[1].lora == "/some/lora" and config.rewards[2].name == "brightness"


def test_cli_help_and_one_line_errors(capsys, tmp_path):
    from diffpo.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "baseline" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("models: [{name: a}]\nrewards: [{name: brightness}]\nprompts: {source: " + str(tmp_path / "none.txt") + "}\n")
    for overrides, message in ((["bogus=1"], "unknown config key 'bogus'"),
                               ([], "prompt file"),
                               (["prompts.source=shapes", "models.0.pretrained=/no/such/model"], "model 'a': model path"),
                               (["rewards.0.name=nope"], "reward 'nope' is unknown")):
        with pytest.raises(SystemExit) as stop:
            main(["eval", str(config), f"output_dir={tmp_path / 'o'}", *overrides])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


# --------------------------------------------------------------------------------------------
# end to end on the bundled model: resume, report files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from diffpo.eval.runner import run_eval

    out = tmp_path_factory.mktemp("eval") / "run"
    return out, run_eval(small_config(out))


def test_run_writes_samples_manifest_and_numbers(small_run):
    out, result = small_run
    assert result["counts"] == {"base": {"generated": 8, "skipped": 0}, "euler": {"generated": 8, "skipped": 0}}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 16
    assert set(manifest[0]) >= {"model", "prompt_index", "image_index", "seed", "prompt", "category", "file"}
    by_model = {m: [(r["prompt_index"], r["image_index"], r["seed"]) for r in manifest if r["model"] == m] for m in ("base", "euler")}
    assert by_model["base"] == by_model["euler"]  # the same seeds for both models
    assert all((out / r["file"]).is_file() for r in manifest)
    scores = json.loads((out / "scores.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    for metric in ("colour-match", "jpeg-compressibility"):
        assert set(scores["summary"][metric]) == {"base", "euler"}
        assert scores["summary"][metric]["base"]["n"] == 8
        assert {"mean", "median", "std", "ci95", "median_ci95"} <= set(scores["summary"][metric]["base"])
        assert scores["win_rates"][metric]["euler"]["n"] == 8
    assert scores["categories"] and scores["by_category"]["colour-match"]
    assert scores["meta"]["provenance"]["versions"]["torch"] == torch.__version__
    assert scores["meta"]["provenance"]["git_commit"]
    assert (out / "config.yaml").is_file()
    assert load_eval_config(out / "config.yaml").models[1].sampling.scheduler == "euler"
    rows = (out / "scores.jsonl").read_text().splitlines()
    assert len(rows) == 16


def test_report_files_exist_with_relative_links_only(small_run):
    out, _ = small_run
    for name in ("index.html", "summary.md", "scores.json", "figures/means.png", "figures/grid.png",
                 "figures/hist_colour-match.png", "figures/hist_jpeg-compressibility.png"):
        assert (out / name).is_file(), name
    page = (out / "index.html").read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", page)
    assert len(links) > 16
    for link in links:
        if link.startswith("#"):
            continue
        assert "://" not in link and not link.startswith(("/", "file:", "//")), link
        assert (out / link).is_file(), link
    assert "<script" not in page and "@import" not in page
    assert "id='summary-table'" in page and "win-rate-table" in page
    summary = (out / "summary.md").read_text()
    assert "| Model | n | colour-match ↑ | jpeg-compressibility ↑ |" in summary
    assert "| base (baseline) | 8 |" in summary and "tie rule" in summary and "per category" in summary


def test_resume_regenerates_only_missing_images(small_run):
    from diffpo.eval.generate import load_sample
    from diffpo.eval.runner import run_eval

    out, _ = small_run
    files = sorted((out / "samples").rglob("*.png"))
    removed = files[3]
    old = load_sample(removed)
    removed.unlink()
    mtimes = {f: f.stat().st_mtime_ns for f in files if f != removed}
    result = run_eval(small_config(out))
    model = removed.parent.name
    other = {"base": "euler", "euler": "base"}[model]
    assert result["counts"][model] == {"generated": 1, "skipped": 7}
    assert result["counts"][other] == {"generated": 0, "skipped": 8}
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())
    assert (load_sample(removed) - old).abs().max() <= 1 / 255 + 1e-6  # the same seed, the same image
    assert not list(out.rglob(".*.tmp"))


# --------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------


def test_temporal_consistency_by_hand():
    from diffpo.eval.video import temporal_consistency

    def colour(rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 4, 4)

    red, yellow, green = colour([1.0, 0.0, 0.0]), colour([1.0, 1.0, 0.0]), colour([0.0, 1.0, 0.0])
    videos = torch.stack([torch.stack([red, yellow, green]), torch.stack([red, red, red])])
    mean_colour = lambda frames: frames.mean(dim=(2, 3))  # noqa: E731 - embedding = mean RGB
    # cos(red, yellow) = cos(yellow, green) = 1/sqrt(2); a still video scores 1
    assert temporal_consistency(videos, mean_colour).tolist() == pytest.approx([1 / math.sqrt(2), 1.0])
    assert math.isnan(temporal_consistency(videos[:, :1], mean_colour)[0])


class MovingSquareVideos:
    """A synthetic video backend: a square of a seed-drawn colour moving across F frames."""

    def __init__(self, frames=4, size=32, speed=4):
        self.frames, self.size, self.speed = frames, size, speed
        self.info = {"backend": "synthetic moving square", "frames": frames}

    def generate(self, prompts, seeds):
        videos = torch.zeros(len(seeds), self.frames, 3, self.size, self.size)
        for b, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            background, fill = torch.rand(3, generator=g), torch.rand(3, generator=g)
            videos[b] = background.view(1, 3, 1, 1)
            for f in range(self.frames):
                x = 2 + f * self.speed
                videos[b, f, :, 8:20, x : x + 12] = fill.view(3, 1, 1)
        return videos


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("tiny-clip")
    arch = "diffpo-eval-tiny-vit"
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{arch}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(arch).state_dict(), root / "clip.pt")
    return arch, root / "clip.pt"


def test_video_path_writes_gifs_and_temporal_consistency(tmp_path, tiny_clip):
    from PIL import Image

    from diffpo.eval.generate import load_sample, save_sample
    from diffpo.eval.runner import run_eval

    video = MovingSquareVideos().generate(["x"], [1])[0]
    save_sample(video, tmp_path / "v.png")
    assert torch.allclose(load_sample(tmp_path / "v.png"), video, atol=0.5 / 255)

    arch, weights = tiny_clip
    config = small_config(tmp_path / "run", models=[{"name": "slow"}, {"name": "fast"}],
                          prompts={"source": "shapes", "max_prompts": 3},
                          rewards=[{"name": "clip", "path": str(weights), "arch": arch, "options": {"raw": True}},
                                   {"name": "brightness"}])
    speeds = {"slow": 0, "fast": 6}
    result = run_eval(config, build_backend=lambda entry, sampling, device, dtype: MovingSquareVideos(speed=speeds[entry.name]))
    out = Path(result["output_dir"])
    assert "temporal_consistency" in result["metrics"]
    # a still square gives identical frames: consistency 1; a moving one less
    assert result["summary"]["temporal_consistency"]["slow"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert result["summary"]["temporal_consistency"]["fast"]["mean"] < 0.9999
    gifs = sorted((out / "media").rglob("*.gif"))
    assert len(gifs) == 12
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4
    page = (out / "index.html").read_text()
    assert ".gif" in page and "Temporal consistency" in page
    assert (out / "figures" / "temporal_consistency.png").is_file()
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        assert not list((out / "media").rglob("*.mp4"))
    else:
        assert len(list((out / "media").rglob("*.mp4"))) == 12


def test_report_from_memory_matches_the_quickstart_statistics(tmp_path):
    """``report_samples`` (what the quickstart calls) reports summarize/paired_win_rate's numbers."""
    from diffpo.eval.comparison import StatsOptions
    from diffpo.eval.runner import report_samples
    from diffpo.eval.stats import paired_win_rate, summarize

    g = torch.Generator().manual_seed(0)
    before, after = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    r_before, r_after = torch.rand(6, generator=g), torch.rand(6, generator=g) + 0.2
    index = report_samples(tmp_path, {"base": before, "aligned": after}, [f"p{i // 2}" for i in range(6)],
                           list(range(6)), {"r": {"base": r_before, "aligned": r_after}},
                           prompt_indices=[i // 2 for i in range(6)], image_indices=[i % 2 for i in range(6)],
                           stats=StatsOptions(unit="sample", seed=3))
    assert index.is_file()
    scores = json.loads((tmp_path / "scores.json").read_text())
    expected = summarize(r_after.numpy(), seed=3)
    assert scores["summary"]["r"]["aligned"]["ci95"] == pytest.approx(expected["ci95"])
    assert scores["summary"]["r"]["aligned"]["mean"] == pytest.approx(expected["mean"])
    win = paired_win_rate(r_after.numpy(), r_before.numpy(), seed=3)
    assert scores["win_rates"]["r"]["aligned"]["mean"] == pytest.approx(win["mean"])
    assert scores["win_rates"]["r"]["aligned"]["ci95"] == pytest.approx(win["ci95"])
