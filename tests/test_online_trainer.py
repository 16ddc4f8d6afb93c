"""The online loop on the bundled tiny model: D3PO from rewards and from human labels, SePPO with
its checkpoint pool, and the pieces they stand on (snapshot references, preferences, rounds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffpo.config import ConfigError, TrainConfig, from_dict
from diffpo.data import rounds
from diffpo.data.preferences import pareto_preference, reward_preferences
from diffpo.trainers import run_training


def online_config(tmp_path, method: str, **overrides) -> TrainConfig:
    data = {
        "method": method, "output_dir": str(tmp_path / method), "max_steps": 1, "train_batch_size": 2,
        "log_every": 1, "progress_bar": False, "model": {"pretrained": "tiny"},
        "objective": {"beta": 0.1 if method == "d3po" else 2000.0}, "optim": {"lr": 1e-3, "max_grad_norm": None},
        "online": {"prompts_per_round": 2, "samples_per_prompt": 2, "num_inference_steps": 4,
                   "rewards": ["jpeg-compressibility"]},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[key] = value
    return from_dict(TrainConfig, data)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "pytorch_lora_weights.safetensors"))


def test_d3po_first_step_loss_is_log2_and_training_moves_the_lora(tmp_path):
    run_dir = run_training(online_config(tmp_path, "d3po", max_steps=2))
    first, second = metrics(run_dir)
    # policy == reference (LoRA B = 0) at the first step: every clipped ratio is 1, the loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["log_ratio_w"] == 0.0 and first["log_ratio_l"] == 0.0
    assert "reward/jpeg-compressibility" in first and first["round"] == 0.0
    assert second["round"] == 1.0  # 2 prompts x 1 pair = 1 pair per round < batch: one step per round
    lora_b = [v for k, v in lora_weights(run_dir).items() if "lora.up" in k or "lora_B" in k]
    assert any(float(v.abs().max()) > 0 for v in lora_b)
    manifest = rounds.read_manifest(rounds.round_dir(run_dir, 0))
    assert manifest.pairs == [(0, 0, 1), (1, 0, 1)]
    assert all(manifest.image_path(g, s).is_file() for g in range(2) for s in range(2))


def test_d3po_resume_continues_exactly(tmp_path):
    straight = run_training(online_config(tmp_path / "a", "d3po", max_steps=2))
    first = run_training(online_config(tmp_path / "b", "d3po", max_steps=1))
    resumed = run_training(online_config(tmp_path / "b", "d3po", max_steps=2, resume_from="latest"))
    assert first == resumed
    a, b = lora_weights(straight), lora_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_d3po_from_human_labels_waits_then_trains_on_the_jsonl(tmp_path):
    config = online_config(tmp_path, "d3po", online__preference="human", online__samples_per_prompt=3)
    run_dir = run_training(config)
    assert not (run_dir / "metrics.jsonl").is_file()  # no step without labels
    folder = rounds.round_dir(run_dir, 0)
    manifest = rounds.read_manifest(folder)
    assert len(manifest.pairs) == 2 * 3  # all pairs of 3 images, for 2 prompts
    # label every pair: "b" wins except one tie, which must give no gradient and count as a tie
    for i, (g, a, b) in enumerate(manifest.pairs):
        rounds.append_label(folder, g, a, b, "tie" if i == 0 else "b")
    resumed = run_training(online_config(tmp_path, "d3po", online__preference="human", online__samples_per_prompt=3,
                                         resume_from="latest"))
    (record,) = metrics(resumed)
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert record["tie_fraction"] == pytest.approx(1 / 6) and record["labelled"] == 6.0
    assert any(float(v.abs().max()) > 0 for k, v in lora_weights(resumed).items() if "lora.up" in k or "lora_B" in k)
    assert json.loads((resumed / "final" / "diffpo.json").read_text())["steps"] == 1


def test_d3po_human_with_partial_labels_keeps_waiting(tmp_path):
    config = online_config(tmp_path, "d3po", online__preference="human")
    run_dir = run_training(config)
    folder = rounds.round_dir(run_dir, 0)
    rounds.append_label(folder, 0, 0, 1, "a")  # one of the two pairs
    again = run_training(online_config(tmp_path, "d3po", online__preference="human", resume_from="latest"))
    assert not (again / "metrics.jsonl").is_file()  # still no training step


def test_seppo_first_step_is_log2_and_the_pool_grows(tmp_path, shapes_parquet):
    config = online_config(tmp_path, "seppo", max_steps=3, data__source=str(shapes_parquet),
                           online__pool_every=1)
    run_dir = run_training(config)
    records = metrics(run_dir)
    # the pool holds only the base model at step 1: policy == reference, sigma_w = 0 -> the flip
    # branch, and -log sigmoid(0) = log 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["flip_rate"] == 1.0 and records[0]["pool_size"] == 1.0
    assert [r["pool_size"] for r in records] == [1.0, 2.0, 3.0]
    index = json.loads((run_dir / "pool" / "pool.json").read_text())
    assert [e["step"] for e in index] == [1, 2, 3]


def test_online_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        online_config(tmp_path, "d3po", online__samples_per_prompt=1)
    with pytest.raises(ConfigError, match="eta"):
        run_training(online_config(tmp_path, "d3po", online__eta=0.0))
    with pytest.raises(ConfigError, match="latent cache"):
        run_training(online_config(tmp_path, "seppo", cache__enabled=True))


# ---- the pieces -------------------------------------------------------------------------------


def test_pareto_dominance_and_margins():
    assert pareto_preference(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])) == 1
    assert pareto_preference(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 2.0])) == 0  # a trade-off: a tie
    assert pareto_preference(torch.tensor([0.0]), torch.tensor([0.3])) == -1
    assert pareto_preference(torch.tensor([0.0]), torch.tensor([0.3]), margin=0.5) == 0
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0]])  # one head, two groups of two samples
    assert reward_preferences(scores, [(0, 0, 1), (1, 0, 1)], 2) == [(0, 0, 1, False), (1, 0, 1, True)]
    flipped = reward_preferences(torch.tensor([[1.0, 3.0]]), [(0, 0, 1)], 2)
    assert flipped == [(0, 1, 0, False)]


def test_labels_jsonl_last_judgement_wins_and_a_torn_line_is_ignored(tmp_path):
    folder = tmp_path / "round"
    folder.mkdir()
    manifest = rounds.write_manifest(folder, 0, ["p0", "p1"], 2, [["a.png", "b.png"], ["c.png", "d.png"]])
    rounds.append_label(folder, 0, 0, 1, "a")
    rounds.append_label(folder, 0, 0, 1, "b")
    with (folder / rounds.LABELS).open("a") as handle:
        handle.write('{"group": 1, "a": 0')  # the writer was killed mid-line
    labels = rounds.read_labels(folder)
    assert labels == {(0, 0, 1): "b"}
    assert rounds.pending_pairs(manifest, labels) == [(1, 0, 1)]
    assert rounds.labelled_preferences(manifest, labels) == [(0, 1, 0, False)]
    (folder / rounds.LABELS).write_text('not json\n{"group": 0, "a": 0, "b": 1, "choice": "a"}\n')
    with pytest.raises(ValueError, match="line 1"):
        rounds.read_labels(folder)


def test_snapshot_reference_is_the_snapshot_and_base_is_adapters_off(tiny_sd_dir):
    from diffpo.models.loading import load_stack, unet_denoiser
    from diffpo.models.lora import attach_lora
    from diffpo.models.reference import LoraSnapshotReference, policy_snapshot

    stack = load_stack(str(tiny_sd_dir))
    unet = stack.unet
    params = attach_lora(unet, 4, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    reference = LoraSnapshotReference(unet)
    assert [p for p in unet.parameters() if p.requires_grad] == params  # the reference adapter is frozen
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    cond = {"encoder_hidden_states": stack.encode_prompts(["a red circle", "a blue square"]).hidden}
    base = unet_denoiser(unet)(x, t, cond).detach()
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    policy_out = unet_denoiser(unet)(x, t, cond).detach()
    assert not torch.allclose(policy_out, base)
    reference.load(None)
    torch.testing.assert_close(reference(x, t, cond), base)
    reference.load(policy_snapshot(unet, "lora"), snapshot_id=1)
    with torch.no_grad():
        for p in params:
            p.mul_(0.0)  # the policy moves on; the snapshot must not
    torch.testing.assert_close(reference(x, t, cond), policy_out)
    assert [p for p in unet.parameters() if p.requires_grad] == params  # switching back restored training
    torch.testing.assert_close(unet_denoiser(unet)(x, t, cond).detach(), base)
