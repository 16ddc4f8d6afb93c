"""Hand-computed objective variants (docs/objective_variants.md), their config keys, the
reference-free path of the offline loop, and the Curry-DPO curriculum order."""

import json
import math
import typing

import pytest
import torch

from diffpo.config import ConfigError, ObjectiveConfig, TrainConfig, from_dict, load_config
from diffpo.kernel.denoising import PairErrors
from diffpo.objectives import METHODS, diffusion_dpo_loss
from diffpo.objectives.variants import (
    OBJECTIVES,
    conservative_dpo_loss,
    kto_feedback_loss,
    kto_loss,
    madpo_loss,
    margin_weights,
    robust_dpo_loss,
    simpo_loss,
)
from diffpo.trainers.common import CurriculumSampler, EpochSampler

LOG2 = math.log(2.0)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def nll(z):  # the DPO logistic loss l(z) = -log sigmoid(z)
    return math.log1p(math.exp(-z))


# One pair: dtheta = 0.30 - 0.50 = -0.20, dref = 0.40 - 0.45 = -0.05, h = 0.075; beta = 10 gives z = 0.75,
# l(z) = log(1 + e^-0.75) = 0.386871, l(-z) = l(z) + z = 1.136871.
PAIR = (torch.tensor([0.30]), torch.tensor([0.50]), torch.tensor([0.40]), torch.tensor([0.45]))


def _errors(w, l, rw=None, rl=None):
    t = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
    return PairErrors(t(w), t(l), t(rw), t(rl))


def test_hand_values_of_the_pair():
    assert nll(0.75) == pytest.approx(0.386871, abs=1e-6) and nll(-0.75) == pytest.approx(1.136871, abs=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("dpo", [nll(0.75), LOG2]),
    ("hinge", [1 - 0.75, 1.0]),  # max(0, 1 - z)
    ("ipo", [(0.075 - 0.05) ** 2, 0.05 ** 2]),  # (h - 1/(2 beta))^2 with 1/(2 beta) = 0.05
], ids=["dpo", "hinge", "ipo"])
def test_dpo_hinge_ipo_through_objective_name(name, expected):
    errors = _errors([0.30, 0.5], [0.50, 0.5], [0.40, 0.5], [0.45, 0.5])
    loss, metrics = METHODS["diffusion_dpo"].loss(errors, ObjectiveConfig(beta=10.0, name=name))
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    direct, _ = diffusion_dpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, 10.0, name)
    assert torch.equal(loss, direct)
    assert metrics["margin"].item() == pytest.approx(0.0375, rel=1e-5)


def test_robust_dpo_hand_computed():
    loss, metrics = robust_dpo_loss(*PAIR, beta=10.0, epsilon=0.1)
    # (0.9 * 0.386871 - 0.1 * 1.136871) / 0.8 = 0.293121
    assert loss.item() == pytest.approx((0.9 * nll(0.75) - 0.1 * nll(-0.75)) / 0.8, rel=1e-6)
    assert loss.item() == pytest.approx(0.293121, abs=1e-6)
    assert metrics["implicit_acc"].item() == 1.0
    plain, _ = robust_dpo_loss(*PAIR, beta=10.0, epsilon=0.0)
    assert plain.item() == pytest.approx(nll(0.75), rel=1e-6)  # eps = 0 is DPO


def test_conservative_dpo_hand_computed():
    loss, _ = conservative_dpo_loss(*PAIR, beta=10.0, epsilon=0.1)
    assert loss.item() == pytest.approx(0.9 * nll(0.75) + 0.1 * nll(-0.75), rel=1e-6)
    assert loss.item() == pytest.approx(0.461871, abs=1e-6)


def test_madpo_weights_and_loss_hand_computed():
    w = margin_weights(torch.tensor([0.7, 0.2, 0.4]), torch.tensor([0.2, 0.7, 0.4]), scale=0.5)
    # margins 0.5, -0.5, 0 over scale 0.5: 2 sigmoid(-1) = 0.537883, 2 sigmoid(1) = 1.462117, 1
    assert w.tolist() == pytest.approx([2 * sigmoid(-1), 2 * sigmoid(1), 1.0], rel=1e-6)
    clipped = margin_weights(torch.tensor([0.7, 0.2]), torch.tensor([0.2, 0.7]), scale=0.5, weight_min=0.6,
                             weight_max=1.2)
    assert clipped.tolist() == pytest.approx([0.6, 1.2])
    assert (margin_weights(torch.tensor([100.0]), torch.tensor([0.0])) >= 0).all()  # never negative
    loss, metrics = madpo_loss(*PAIR, weights=w[:1], beta=10.0)
    assert loss.item() == pytest.approx(2 * sigmoid(-1) * nll(0.75), rel=1e-6)
    assert metrics["dpo_loss"].item() == pytest.approx(nll(0.75), rel=1e-6)
    assert metrics["pair_weight"].item() == pytest.approx(2 * sigmoid(-1), rel=1e-6)


def test_madpo_reads_scores_from_the_batch():
    objective = ObjectiveConfig(beta=10.0, name="madpo", madpo_scale=0.5)
    batch = {"score_w": torch.tensor([0.7]), "score_l": torch.tensor([0.2])}
    loss, _ = METHODS["diffusion_dpo"].loss(_errors([0.30], [0.50], [0.40], [0.45]), objective, batch)
    assert loss.item() == pytest.approx(2 * sigmoid(-1) * nll(0.75), rel=1e-6)
    with pytest.raises(ValueError, match="set data.score_columns"):
        METHODS["diffusion_dpo"].loss(_errors([0.3], [0.5], [0.4], [0.45]), objective, {"caption": ["x"]})


def test_simpo_is_reference_free_and_hand_computed():
    loss, metrics = simpo_loss(torch.tensor([0.30]), torch.tensor([0.50]), beta=10.0, gamma_margin=0.5)
    # -1/2 * 10 * (0.30 - 0.50) - 0.5 = 0.5
    assert loss.item() == pytest.approx(nll(0.5), rel=1e-6) and loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert "ref_gap" not in metrics and metrics["implicit_acc"].item() == 1.0
    objective = ObjectiveConfig(beta=10.0, name="simpo", gamma_margin=0.5)
    assert objective.reference_free and not ObjectiveConfig().reference_free
    dispatched, _ = METHODS["diffusion_dpo"].loss(_errors([0.30], [0.50]), objective)  # ref_w is None
    assert dispatched.item() == pytest.approx(loss.item())
    # documented value with equal policy errors and gamma = 0: log 2
    even, _ = simpo_loss(torch.tensor([0.4]), torch.tensor([0.4]), beta=5000.0)
    assert even.item() == pytest.approx(LOG2)


def test_kto_hand_computed_with_zero_and_positive_reference_point():
    # pair 1: r_w = -5 (0.30 - 0.40) = 0.5, r_l = -5 (0.50 - 0.45) = -0.25; pair 2: r_w = 0, r_l = -0.5.
    # mean r = -0.0625 -> z_ref = max(0, .) = 0
    loss, metrics = kto_loss(torch.tensor([0.30, 0.2]), torch.tensor([0.50, 0.6]), torch.tensor([0.40, 0.2]),
                             torch.tensor([0.45, 0.5]), beta=10.0)
    expected = [0.5 * ((1 - sigmoid(0.5)) + (1 - sigmoid(0.25))), 0.5 * ((1 - sigmoid(0.0)) + (1 - sigmoid(0.5)))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert loss.tolist() == pytest.approx([0.407682, 0.438770], abs=1e-6)
    assert metrics["kto_z_ref"].item() == 0.0
    # one pair with r_w = 1.0, r_l = 0.5: z_ref = 0.75, both terms 1 - sigmoid(0.25) = 0.437824
    pw = torch.tensor([0.1], requires_grad=True)
    loss, metrics = kto_loss(pw, torch.tensor([0.4]), torch.tensor([0.3]), torch.tensor([0.5]), beta=10.0)
    assert metrics["kto_z_ref"].item() == pytest.approx(0.75) and loss.item() == pytest.approx(1 - sigmoid(0.25))
    loss.sum().backward()
    # z_ref is detached: d/dpw 0.5 (1 - sigmoid(-5 (pw - 0.3) - z)) = 2.5 sigmoid'(0.25)
    assert pw.grad.item() == pytest.approx(2.5 * sigmoid(0.25) * (1 - sigmoid(0.25)), rel=1e-5)


@pytest.mark.parametrize("name,at_init", [
    ("dpo", LOG2), ("robust_dpo", LOG2), ("cdpo", LOG2), ("madpo", LOG2), ("kto", 0.5),
    ("hinge", 1.0), ("ipo", 1 / (4 * 5000.0 ** 2)),
])
def test_values_at_initialisation(name, at_init):
    e_w, e_l = torch.rand(4), torch.rand(4)
    errors = PairErrors(e_w, e_l, e_w.clone(), e_l.clone())
    batch = {"score_w": torch.full((4,), 0.3), "score_l": torch.full((4,), 0.3)}  # equal scores: weight 1
    loss, metrics = METHODS["diffusion_dpo"].loss(errors, ObjectiveConfig(name=name, epsilon=0.2), batch)
    assert loss.tolist() == pytest.approx([at_init] * 4, rel=1e-6)
    assert metrics["implicit_acc"].item() == 0.5


def test_madpo_at_initialisation_is_weight_times_log2():
    e = torch.rand(2)
    loss, _ = madpo_loss(e, e.flip(0), e.clone(), e.flip(0).clone(), torch.tensor([0.25, 1.5]), beta=5000.0)
    assert loss.tolist() == pytest.approx([0.25 * LOG2, 1.5 * LOG2], rel=1e-6)


def test_every_configurable_name_has_an_objective():
    names = typing.get_args(typing.get_type_hints(ObjectiveConfig)["name"])
    assert set(names) == set(OBJECTIVES)


def test_reference_based_variants_refuse_missing_reference_errors():
    for name in ("dpo", "robust_dpo", "cdpo", "kto"):
        with pytest.raises(ValueError, match=f"objective.name={name} compares against the reference"):
            METHODS["diffusion_dpo"].loss(_errors([0.3], [0.5]), ObjectiveConfig(name=name))


def test_yaml_selects_a_variant(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: {name: robust_dpo, epsilon: 0.1}\n")
    config = load_config(TrainConfig, path)
    assert config.objective.name == "robust_dpo" and config.objective.epsilon == 0.1
    with pytest.raises(ConfigError, match="unknown config key 'objective.loss_type'"):
        from_dict(TrainConfig, {"objective": {"loss_type": "hinge"}})


@pytest.mark.parametrize("data,match", [
    ({"objective": {"name": "robust_dpo", "epsilon": 0.5}}, r"objective.epsilon=0.5 must lie in \[0, 0.5\)"),
    ({"objective": {"madpo_weight_min": -0.1}}, "never negative"),
    ({"objective": {"madpo_scale": 0}}, "objective.madpo_scale=0.0 must be > 0"),
    ({"objective": {"name": "madpo"}}, "objective.name=madpo weights pairs by a reward margin: set data.score_columns"),
    ({"objective": {"name": "madpo"}, "data": {"score_columns": ["a", "b"]}, "cache": {"enabled": True}},
     "set cache.enabled=false"),
    ({"method": "sft", "objective": {"name": "simpo"}}, "objective.name=simpo is a loss of method=diffusion_dpo"),
    ({"data": {"curriculum_stages": 2}}, "data.curriculum_stages=2 orders pairs by reward margin"),
    ({"data": {"curriculum_stages": -1}}, "must be >= 0"),
    ({"method": "d3po", "data": {"curriculum_stages": 2, "score_columns": ["a", "b"]}}, "samples online"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_errors_are_one_line_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match) as error:
        from_dict(TrainConfig, data)
    assert "\n" not in str(error.value)


# ---- curriculum ---------------------------------------------------------------------------------

MARGINS = [0.1, 0.9, 0.5, 0.7, 0.3, 0.9]  # sorted large -> small, ties by index: 1, 5, 3, 2, 4, 0


def test_curriculum_with_one_pair_per_stage_is_exactly_easy_to_hard():
    sampler = CurriculumSampler(MARGINS, stages=6, seed=0)
    assert list(sampler) == [1, 5, 3, 2, 4, 0]


def test_curriculum_stages_are_shuffled_in_sequence_then_plain_epochs():
    sampler = CurriculumSampler(MARGINS, stages=2, seed=3)
    assert sampler.stages == [[1, 5, 3], [2, 4, 0]]
    order = list(sampler)
    assert set(order[:3]) == {1, 3, 5} and set(order[3:]) == {0, 2, 4}
    expected = []
    for number, stage in enumerate(sampler.stages):  # the documented per-stage stream
        perm = torch.randperm(3, generator=torch.Generator().manual_seed(3 * 7_919 + 1_000_003 * (number + 1)))
        expected += [stage[i] for i in perm.tolist()]
    assert order == expected
    plain = EpochSampler(6, seed=3)
    for epoch in (1, 2):
        sampler.start_epoch(epoch)
        plain.start_epoch(epoch)
        assert list(sampler) == list(plain)
    # a pure function of (seed, epoch): going back, or a fresh sampler, gives the same order
    sampler.start_epoch(0)
    assert list(sampler) == order == list(CurriculumSampler(MARGINS, stages=2, seed=3))
    assert list(CurriculumSampler(MARGINS, stages=3, seed=0))[:2] in ([1, 5], [5, 1])  # 3 stages of 2


def test_curriculum_rejects_bad_stage_counts_and_nan_scores():
    with pytest.raises(ValueError, match=r"data.curriculum_stages=7 must lie in \[1, 6\]"):
        CurriculumSampler(MARGINS, stages=7, seed=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        CurriculumSampler([0.1, float("nan")], stages=1, seed=0)


def test_score_margins_are_winner_minus_loser(tmp_path):
    import datasets

    from diffpo.data.pairs import PreferencePairs

    table = datasets.Dataset.from_dict({"jpg_0": [b""] * 3, "jpg_1": [b""] * 3, "label_0": [1.0, 0.0, 1.0],
                                        "caption": ["a", "b", "c"], "r0": [0.9, 0.2, 0.4], "r1": [0.1, 0.6, 0.5]})
    pairs = PreferencePairs(table, 32, score_columns=["r0", "r1"])
    # row 1 prefers image 1: winner score 0.6, loser 0.2
    assert pairs.score_margins().tolist() == pytest.approx([0.8, 0.4, -0.1])


# ---- the offline loop on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_parquet(tmp_path_factory):
    """16 shape pairs with reward_0 / reward_1 columns (labels alternate, scores spread)."""
    from conftest import make_pairs
    from diffpo.data.writer import write_pairs_parquet

    rows = make_pairs(16, seed=2)
    for i, row in enumerate(rows):
        row["reward_0"], row["reward_1"] = float((i * 7) % 11) / 10, float((i * 3) % 5) / 10
    return str(write_pairs_parquet(tmp_path_factory.mktemp("scored") / "pairs.parquet", rows))


def _run(tmp_path, model_dir, data, name, *overrides):
    from diffpo.trainers import run_training

    config = load_config(TrainConfig, None, [
        f"model.pretrained={model_dir}", f"data.source={data}", f"output_dir={tmp_path / name}", "max_steps=2",
        "train_batch_size=4", "optim.lr=1e-3", "objective.beta=2000", "progress_bar=false", *overrides])
    run_dir = run_training(config)
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _count_unet_forwards(monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = []
    forward = UNet2DConditionModel.forward

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0] if args else kwargs["sample"].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return calls


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_free_objective_never_builds_or_runs_a_reference(tmp_path, tiny_sd_dir, shapes_parquet,
                                                                    monkeypatch, finetune):
    from diffpo.models import reference

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference was built for a reference-free objective")

    monkeypatch.setattr(reference.AdaptersDisabledReference, "__init__", forbidden)
    monkeypatch.setattr(reference.FrozenCopyReference, "__init__", forbidden)
    calls = _count_unet_forwards(monkeypatch)
    _, metrics = _run(tmp_path, tiny_sd_dir, shapes_parquet, finetune, "objective.name=simpo", f"finetune={finetune}",
                      "optim.lr=1e-4")
    assert calls == [8, 8]  # one policy forward of the 2 x 4 concatenated pairs per micro-step, nothing else
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert "ref_gap" not in metrics[0] and "ref_err_w" not in metrics[0]


def test_reference_based_objective_runs_two_forwards(tmp_path, tiny_sd_dir, shapes_parquet, monkeypatch):
    calls = _count_unet_forwards(monkeypatch)
    _, metrics = _run(tmp_path, tiny_sd_dir, shapes_parquet, "dpo", "max_steps=1")
    assert calls == [8, 8] and "ref_gap" in metrics[0]


@pytest.mark.parametrize("overrides,at_init", [
    (["objective.name=robust_dpo", "objective.epsilon=0.2"], LOG2),
    (["objective.name=cdpo"], LOG2),
    (["objective.name=kto"], 0.5),
    (["objective.name=madpo", "data.score_columns=[reward_0,reward_1]", "objective.madpo_scale=1e9"], LOG2),
], ids=["robust_dpo", "cdpo", "kto", "madpo"])
def test_variants_train_from_their_documented_initial_value(tmp_path, tiny_sd_dir, scored_parquet, overrides,
                                                             at_init):
    # madpo with a huge scale: every weight is 2 sigmoid(~0) = 1, so its first loss is log 2 as well
    _, metrics = _run(tmp_path, tiny_sd_dir, scored_parquet, "v", *overrides)
    assert metrics[0]["loss"] == pytest.approx(at_init, abs=1e-6)
    assert any(abs(m["loss"] - at_init) > 1e-5 for m in metrics[1:])


def test_curriculum_drives_the_offline_loop_and_resumes_exactly(tmp_path, tiny_sd_dir, scored_parquet, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from diffpo.data import pairs as pairs_module
    from diffpo.data.pairs import build_pairs
    from diffpo.config import DataConfig

    seen = []
    collate = pairs_module.collate_pairs

    def recording(items):
        seen.extend(int(item["index"]) for item in items)
        return collate(items)

    monkeypatch.setattr(pairs_module, "collate_pairs", recording)
    extra = ["data.score_columns=[reward_0,reward_1]", "data.curriculum_stages=2", "max_steps=5"]
    straight, _ = _run(tmp_path, tiny_sd_dir, scored_parquet, "straight", *extra)
    margins = build_pairs(DataConfig(source=scored_parquet, score_columns=["reward_0", "reward_1"]), 32, 0).score_margins()
    curriculum = list(CurriculumSampler(margins, 2, 0))
    assert seen[:16] == curriculum  # 16 pairs, 4 per step: epoch 0 is the curriculum
    assert set(seen[:8]) == set(curriculum[:8]) and min(margins[seen[:8]]) >= max(margins[seen[8:16]])
    sampler = EpochSampler(16, 0)
    sampler.start_epoch(1)
    assert seen[16:20] == list(sampler)[:4]  # then plain epochs
    resumed, _ = _run(tmp_path, tiny_sd_dir, scored_parquet, "resumed", *extra, "checkpoint_every=3")
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-5")
    _run(tmp_path, tiny_sd_dir, scored_parquet, "resumed", *extra, "checkpoint_every=3", "resume_from=latest")
    a = load_file(straight / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- Diffusion-KTO on unpaired feedback ---------------------------------------------------------------


def test_kto_feedback_loss_hand_computed_and_pairs_are_its_special_case():
    policy, ref = torch.tensor([0.10, 0.30, 0.20]), torch.tensor([0.12, 0.25, 0.20])
    desirable = torch.tensor([1.0, 0.0, 1.0])
    loss, metrics = kto_feedback_loss(policy, ref, desirable, beta=100.0)
    r = [-50 * (0.10 - 0.12), -50 * (0.30 - 0.25), 0.0]  # [1.0, -2.5, 0.0]: mean < 0, so z_ref = 0
    expected = [1 - sigmoid(r[0]), 1 - sigmoid(-r[1]), 1 - sigmoid(r[2])]
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert float(metrics["kto_z_ref"]) == 0.0
    # pairs data = winners desirable, losers undesirable, one reference point over all 2B images
    pw, pl, rw, rl = torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2]), torch.tensor([0.2, 0.3]), torch.tensor([0.3, 0.3])
    paired, _ = kto_loss(pw, pl, rw, rl, beta=10.0)
    images, _ = kto_feedback_loss(torch.cat([pw, pl]), torch.cat([rw, rl]), torch.tensor([1.0, 1.0, 0.0, 0.0]), 10.0)
    torch.testing.assert_close(paired, 0.5 * (images[:2] + images[2:]))


@pytest.fixture(scope="module")
def feedback_parquet(tmp_path_factory):
    """12 single shape images with a binary desirable label each (an unpaired feedback table)."""
    from diffpo.data.shapes import sample_shapes
    from diffpo.data.writer import write_images_parquet

    shapes = sample_shapes(12, seed=4)
    return str(write_images_parquet(tmp_path_factory.mktemp("feedback") / "feedback.parquet", [im for im, _ in shapes],
                                    [c for _, c in shapes], {"thumbs_up": [i % 3 != 0 for i in range(12)]}))


def test_kto_trains_on_unpaired_feedback_from_one_half(tmp_path, tiny_sd_dir, feedback_parquet, monkeypatch):
    calls = _count_unet_forwards(monkeypatch)
    _, metrics = _run(tmp_path, tiny_sd_dir, feedback_parquet, "kto", "objective.name=kto", "data.feedback_column=thumbs_up")
    # one image per row, noised on its own: a policy and a reference forward of the 4 images per step
    assert calls == [4, 4, 4, 4]
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # r = z_ref = 0 at initialisation
    assert 0.0 < metrics[0]["desirable_fraction"] < 1.0
    assert abs(metrics[1]["loss"] - 0.5) > 1e-6


def test_unpaired_feedback_errors_name_the_fix(tmp_path, tiny_sd_dir, feedback_parquet):
    with pytest.raises(ConfigError, match="train it with objective.name=kto"):
        from_dict(TrainConfig, {"data": {"feedback_column": "thumbs_up"}})
    import pyarrow.parquet as pq

    table = pq.read_table(feedback_parquet)
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(2, "thumbs_up", [[0.5] * table.num_rows]), bad)
    from diffpo.data.pairs import DataError

    with pytest.raises(DataError, match="thumbs_up must be 1 .desirable. or 0"):
        _run(tmp_path, tiny_sd_dir, str(bad), "bad", "objective.name=kto", "data.feedback_column=thumbs_up")
