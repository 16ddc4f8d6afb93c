"""Sem-DPO rewriter training end to end on the tiny LM: outputs, log 2 at init, exact resume,
export and reload, and errors on bad pairs files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffpo.config import ConfigError, from_dict, load_config
from diffpo.prompt.config import PromptTrainConfig
from diffpo.prompt.train import read_pairs, train_rewriter

LOG2 = torch.tensor(math.log(2.0)).item()  # log 2 as the fp32 loss holds it


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny LM ops: threads only spin


def write_pairs(path, count: int = 5) -> str:
    rows = [{"prompt": f"a cat number {i}", "chosen": f"a fluffy cat number {i}, golden hour, 35mm",
             "rejected": f"dog {i}", "reward_chosen": 1.0 + i, "reward_rejected": 0.5, "cos_chosen": 0.9 - 0.1 * i,
             "cos_rejected": 0.3} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def config(tmp_path, name: str, **overrides) -> PromptTrainConfig:
    data = {"pairs": write_pairs(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / name),
            "rewriter": {"model": "tiny"}, "train_batch_size": 2, "max_steps": 2, "progress_bar": False,
            "optim": {"lr": 1e-2}, "alpha": 0.0, "lora": {"rank": 4, "dropout": 0.1}}
    data.update(overrides)
    return from_dict(PromptTrainConfig, data)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two optimizer steps in one go, with a checkpoint after the first."""
    tmp_path = tmp_path_factory.mktemp("prompt-train")
    return tmp_path, train_rewriter(config(tmp_path, "straight", checkpoint_every=1))


def test_training_writes_a_run_dir_and_starts_at_log2(straight_run):
    tmp_path, run_dir = straight_run
    assert load_config(PromptTrainConfig, run_dir / "config.yaml") == config(tmp_path, "straight", checkpoint_every=1)
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == LOG2 and records[0]["acc"] == 0.5  # LoRA B = 0: policy = reference
    assert records[0]["reward_margin"] == 0.0
    assert records[1]["loss"] < LOG2  # the update moved towards the chosen rewrites
    assert {"acc", "weight_mean", "reward_chosen", "reward_rejected", "reward_margin", "lr"} <= set(records[0])
    final = run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    meta = json.loads((final / "diffpo_rewriter.json").read_text())
    assert meta["base"] == "tiny" and "{prompt}" in meta["template"]["instruction"]
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-1", "step-2"]


def test_resume_reproduces_the_straight_run_exactly(straight_run):
    from safetensors.torch import load_file

    tmp_path, run_dir = straight_run
    resumed = train_rewriter(config(tmp_path, "resumed", resume_from=str(run_dir / "checkpoints" / "step-1")))
    straight = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    again = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert straight.keys() == again.keys() and straight
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    assert [r["step"] for r in metrics(resumed)] == [2]  # it did start from the checkpoint
    assert metrics(resumed)[-1]["loss"] == metrics(run_dir)[-1]["loss"]


def test_exported_rewriter_loads_back_with_the_trained_logprobs(straight_run):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffpo.prompt.lm import RewriteTemplate, build_tiny_lm, completion_batch, load_rewriter, render_inputs, sequence_logprobs
    from diffpo.prompt.lm import rewriter_template
    from diffpo.prompt.train import attach_rewriter_lora

    tmp_path, run_dir = straight_run
    trained, tokenizer = build_tiny_lm(0)
    trained = attach_rewriter_lora(trained, config(tmp_path, "x").lora)
    set_peft_model_state_dict(trained, load_file(str(run_dir / "checkpoints" / "step-2" / "lora_adapter.safetensors")))
    trained.eval()
    loaded, loaded_tokenizer = load_rewriter(str(run_dir / "final"))
    batch = completion_batch(tokenizer, render_inputs(tokenizer, ["a cat", "a ship"], RewriteTemplate()),
                             ["a fluffy cat, golden hour", "a ship"])
    with torch.no_grad():
        expected = sequence_logprobs(trained, **batch)
        base = sequence_logprobs(build_tiny_lm(0)[0], **batch)
        assert torch.allclose(sequence_logprobs(loaded, **batch), expected, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)  # training changed the model
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert rewriter_template(str(run_dir / "final")) == RewriteTemplate()


def test_semantic_weights_and_accumulation(tmp_path):
    settings = {"alpha": 2.0, "max_steps": 1, "gradient_accumulation_steps": 2, "train_batch_size": 1,
                "lora": {"rank": 2}}
    raw = metrics(train_rewriter(config(tmp_path, "raw", normalize_weights=False, **settings)))[0]
    assert raw["dpo_loss"] == LOG2
    assert 0.0 < raw["weight_mean"] < 1.0  # the paper's W = exp(-2 (1 - cos)) with cos in 0.5..0.9
    assert raw["loss"] == pytest.approx(LOG2 * raw["weight_mean"], rel=1e-6)
    # normalised (the default): every W divided by its mean over the file's five pairs, by hand
    scaled = metrics(train_rewriter(config(tmp_path, "scaled", **settings)))[0]
    file_mean = sum(math.exp(-2.0 * (1.0 - (0.9 - 0.1 * i))) for i in range(5)) / 5
    assert scaled["weight_mean"] == pytest.approx(raw["weight_mean"] / file_mean, rel=1e-6)
    assert scaled["loss"] == pytest.approx(LOG2 * scaled["weight_mean"], rel=1e-6)


def test_bad_pairs_files_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "cos_chosen": 1.0}) + "\n"
                    + json.dumps({"prompt": "a", "rejected": "c", "cos_chosen": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: key 'chosen' is missing") as error:
        read_pairs(path)
    assert "\n" not in str(error.value)
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(ValueError, match=r":1: key 'cos_chosen'"):
        read_pairs(path)
    assert read_pairs(path, need_cosine=False)[0]["cos_chosen"] == 1.0  # alpha = 0 needs no cosine
    path.write_text('{"prompt": "a",\n')
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        train_rewriter(config(tmp_path, "empty", pairs=str(path)))
    with pytest.raises(ConfigError, match="is not a file"):
        read_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="unknown config key 'lora.rnak'"):
        from_dict(PromptTrainConfig, {"lora": {"rnak": 2}})


@pytest.mark.slow
def test_smollm2_generates_and_trains(tmp_path):
    import time

    from diffpo.prompt.lm import generate_rewrites, load_rewriter

    start = time.time()
    model, tokenizer = load_rewriter("smollm2")
    loaded = time.time()
    rewrites = generate_rewrites(model, tokenizer, ["a lighthouse on a cliff"], n=2, max_new_tokens=32, seed=0)
    generated = time.time()
    assert len(rewrites[0]) == 2 and all(rewrites[0])
    del model
    run_dir = train_rewriter(config(tmp_path, "smollm2", rewriter={"model": "smollm2"}, optim={"lr": 1e-4},
                                    lora={"rank": 4}))
    records = metrics(run_dir)
    assert records[0]["loss"] == LOG2 and len(records) == 2
    print(f"\nsmollm2: load {loaded - start:.1f}s, generate 2x32 tokens {generated - loaded:.1f}s, "
          f"train 2 steps (incl. load) {time.time() - generated:.1f}s; rewrites: {rewrites[0]}")
