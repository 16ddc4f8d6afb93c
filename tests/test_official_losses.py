"""SmPO and Diffusion-DRO recomputed from the official code's formulas on fixed batches and compared
with diffpo's objectives (docs/methods.md, "Checked against the official code").

Official code read: JaydenLyh/SmPO at 8922d54 (``train.py``, `` preprocessing.py``,
``examples/sd15.sh``; its requirements pin diffusers 0.20.0) and basiclab/DiffusionDRO at b0693ec
(``train.py``, ``misc/buffer.py``, ``misc/patch.py``; diffusers 0.32.0). Everything below is
rewritten here from those formulas (no code copied), in the official order of operations and on
the official tensors (one pair per device for SmPO, as ``examples/sd15.sh``).

Mapping of conventions:
* SmPO ``--beta_dpo`` = diffpo ``objective.beta`` (both -1/2 * beta * ...: DESIGN.md's convention);
  the official hard-coded ``* 10`` = diffpo ``objective.gamma = 10``; the official orders every
  pair by PickScore (``ps_label_0``) so that p >= 1/2, diffpo keeps the stored order and lets p < 1/2
  flip the sign: the same loss.
* Diffusion-DRO ``--margin`` = diffpo ``objective.margin``; no beta.

Measured here (``pytest -s`` prints them):
* SmPO soft labels: bit-identical; SmPO loss from per-sample errors: max |official - diffpo| = 0.0
  in float64, 1.8e-7 in float32 (the official code multiplies by 10 after rounding -1/2 beta (2p - 1)).
* SmPO on the bundled tiny model, whole micro-step (ReNoise inversion by the policy, target tau,
  policy and reference errors, loss) with diffusers' current DDIMInverseScheduler: diffpo's
  ``inversion_grid="shared"`` gives the same x~ to 2e-5 and the same loss to 4e-5 relative (fp32).
* With the DDIMInverseScheduler of diffusers 0.20.0 (the version the official code pins) the
  official x~ lands on the first inversion point at or above t, each step's predictions made at
  the point it starts from (t = -199 for the step off x_0), not below t as ``shared`` or on t as
  ``per_sample``: a real difference in the inversion target, and another loss.
* Diffusion-DRO loss, from errors and as a whole micro-step on the tiny model: difference 0.0.
* Diffusion-DRO online sampler: the official per-sample DPM-Solver steps every sample with the
  first sample's noise levels (its grid's sigmas) while the UNet is told the sample's own jittered
  timestep; diffpo steps each sample on its own grid. Equal for sample 0 and for unjittered grids.
* Diagnoses: the SmPO loss is flat when both errors rise together and its first gradient is exactly
  reversed by swapping labels; DRO negatives stored with guidance g push the policy's conditional
  prediction towards the unconditional one by 2 (g - 1) / d; and (slow) the SmPO gradient direction
  at initialisation against Diffusion-DPO's for each inversion target.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffpo.kernel.denoising import batch_errors, per_sample_error, prediction_target
from diffpo.kernel.inversion import inversion_target, invert_to_timesteps
from diffpo.kernel.trajectory import sample_dpm_solver
from diffpo.objectives.dro import dro_loss
from diffpo.objectives.smpo import PICKSCORE_HIGH, PICKSCORE_LOW, smpo_loss, soft_labels

BETA_SD15 = 2000.0  # examples/sd15.sh --beta_dpo 2000
TINY = "assets/tiny-sd-shapes"


# ---- the official SmPO formulas -------------------------------------------------------------------


def official_soft_label(ps_score_0: float, ps_score_1: float, dtype=torch.float32) -> tuple[bool, torch.Tensor]:
    """`` preprocessing.py`` / ``train.py`` ``preprocess_train``: ps_label_0 = 1 if score_0 > score_1
    else 0; the images are reversed when it is 0, so the PickScore winner comes first; its score and
    the loser's are min-max normalised with the PickScore constants and p = e^nw / (e^nw + e^nl)
    (float32 in the official code). Returns (swapped, p)."""
    ps_label_0 = 1 if ps_score_0 > ps_score_1 else 0
    score_w, score_l = (ps_score_0, ps_score_1) if ps_label_0 else (ps_score_1, ps_score_0)
    max_val, min_val = 0.28201571106910706, 0.11543526500463486
    norm_w = torch.tensor((score_w - min_val) / (max_val - min_val), dtype=dtype)
    norm_l = torch.tensor((score_l - min_val) / (max_val - min_val), dtype=dtype)
    return ps_label_0 == 0, torch.exp(norm_w) / (torch.exp(norm_w) + torch.exp(norm_l))


def official_smpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, prob: torch.Tensor,
                       beta_dpo: float) -> torch.Tensor:
    """``train.py`` lines 1046-1064 for one micro-batch [winners; losers] (one pair per device)."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo * (2 * prob - 1) * 10
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def _pickscores() -> list[tuple[float, float]]:
    """Raw PickScore cosines of image 0 and image 1 of six pairs: both orders, a tie, small and large gaps."""
    return [(0.2231, 0.2010), (0.1874, 0.2402), (0.2150, 0.2150), (0.1702, 0.1699), (0.2650, 0.1300), (0.1999, 0.2003)]


def test_smpo_loss_from_errors_equals_the_official_formula():
    """Per-sample predictions, targets and PickScores of 6 pairs in diffpo's stored order (image 0 as
    'w'): the official computation (PickScore ordering, its soft label, ``* 10``) and diffpo's
    ``soft_labels`` + ``smpo_loss`` (beta 2000, gamma 10). The soft labels are equal (p of a pair the
    official code reverses is 1 - p of diffpo's order); the loss is equal in float64 and to float32
    rounding end to end: the official code rounds -1/2 beta (2p - 1) and then * 10 in float32,
    diffpo multiplies by -1/2 beta gamma once."""
    g = torch.Generator().manual_seed(18)
    scores = _pickscores()
    n, shape = len(scores), (4, 8, 8)
    target = torch.randn(2 * n, *shape, generator=g, dtype=torch.float64)
    ref_pred = target + 0.3 * torch.randn(2 * n, *shape, generator=g, dtype=torch.float64)
    model_pred = ref_pred + 0.02 * torch.randn(2 * n, *shape, generator=g, dtype=torch.float64)
    p = soft_labels(torch.tensor([s[0] for s in scores]), torch.tensor([s[1] for s in scores]))

    results = {}
    for dtype in (torch.float64, torch.float32):
        official, official_p, swaps = [], [], []
        for i, (s0, s1) in enumerate(scores):
            swapped, prob = official_soft_label(s0, s1, dtype)
            order = [n + i, i] if swapped else [i, n + i]
            official.append(official_smpo_loss(model_pred[order].to(dtype), ref_pred[order].to(dtype),
                                               target[order].to(dtype), prob, BETA_SD15))
            official_p.append(prob)
            swaps.append(swapped)
        official_p, swaps = torch.stack(official_p), torch.tensor(swaps)
        assert swaps.tolist() == [False, True, True, False, False, True]  # the tie is reversed too
        if dtype == torch.float32:  # diffpo's soft labels, read in the official order, bit for bit
            assert torch.equal(torch.where(swaps, 1 - p, p), official_p)
        official_p = torch.where(swaps, 1 - official_p, official_p)  # in diffpo's stored order
        errors_policy = per_sample_error(model_pred.to(dtype), target.to(dtype)).to(dtype)
        errors_ref = per_sample_error(ref_pred.to(dtype), target.to(dtype)).to(dtype)
        if dtype == torch.float64:  # per_sample_error works in fp32: recompute its mean in float64
            errors_policy = (target - model_pred).pow(2).flatten(1).mean(dim=1)
            errors_ref = (target - ref_pred).pow(2).flatten(1).mean(dim=1)
        ours, _ = smpo_loss(*errors_policy.chunk(2), *errors_ref.chunk(2), official_p.to(dtype) if dtype == torch.float64 else p,
                            beta=BETA_SD15, gamma=10.0)
        results[dtype] = (torch.stack(official), ours)

    official, ours = results[torch.float32]
    difference64 = (results[torch.float64][0] - results[torch.float64][1]).abs().max().item()
    difference32 = (official - ours).abs().max().item()
    print(f"\nSmPO loss from errors: official {official.tolist()}\n  max |official - diffpo|: "
          f"float64 {difference64:.1e}, float32 {difference32:.1e}")
    assert difference64 < 1e-12
    assert difference32 < 5e-7  # a few float32 ulps of losses of order 1
    assert ours[2].item() == pytest.approx(math.log(2))  # the tie: p = 1/2 in both codes
    assert (ours - math.log(2)).abs().max() > 0.1  # the others carry a signal


def test_smpo_loss_is_flat_when_both_errors_rise_together():
    """What the loss rewards when both errors rise: nothing. It depends on e_w - e_l only, so raising
    both policy errors by the same amount leaves it unchanged, and its gradient on (e_w, e_l) is equal
    and opposite (dyadic numbers: exact arithmetic)."""
    e_w = torch.tensor([0.25, 0.5, 0.125], requires_grad=True)
    e_l = torch.tensor([0.375, 0.25, 0.125], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.375, 0.25])
    p = torch.tensor([0.75, 0.625, 0.25])
    loss, _ = smpo_loss(e_w, e_l, ref_w, ref_l, p, beta=1.0, gamma=10.0)
    shifted, _ = smpo_loss(e_w + 0.5, e_l + 0.5, ref_w, ref_l, p, beta=1.0, gamma=10.0)
    assert torch.equal(loss, shifted)
    loss.sum().backward()
    assert torch.equal(e_w.grad, -e_l.grad)
    # sign: p > 1/2 pushes e_w down (positive gradient) and e_l up; p < 1/2 the reverse
    assert (e_w.grad[:2] > 0).all() and e_w.grad[2] < 0
    # At initialisation (policy = reference) swapping every label (p -> 1 - p) negates the gradient
    # exactly: the first update of a swapped run is the reverse of the unswapped one, so damage seen in
    # both label directions has to build up over training (curvature, the moving inversion target).
    grads = []
    for labels in (p, 1 - p):
        w, l = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
        loss, _ = smpo_loss(w, l, ref_w, ref_l, labels, beta=1.0, gamma=10.0)
        torch.testing.assert_close(loss, torch.full((3,), math.log(2)))
        loss.sum().backward()
        grads.append((w.grad, l.grad))
    assert torch.equal(grads[0][0], -grads[1][0]) and torch.equal(grads[0][1], -grads[1][1])
    assert torch.equal(grads[0][0], 2.5 * (2 * p - 1))  # 1/2 * beta * gamma * (2p - 1) * sigmoid(0)


# ---- SmPO on the bundled tiny model: the inversion, the target, the whole micro-step -------------


@pytest.fixture(scope="module")
def tiny_models():
    """The bundled tiny model, 6 shape images as 3 pairs, their conditioning, and a policy that is a
    fixed perturbation of the UNet (so that the loss is not log 2) with the UNet as reference."""
    from diffusers import DDIMScheduler

    from diffpo.data.shapes import sample_shapes
    from diffpo.models.loading import load_stack

    stack = load_stack("tiny")
    shapes = sample_shapes(6, size=stack.native_resolution, seed=3)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im, _ in shapes])
    mean, _ = stack.encode_images(pixels)
    latents = mean * stack.vae.config.scaling_factor  # (6, 4, 16, 16): pairs (0, 3), (1, 4), (2, 5)
    hidden = stack.encode_prompts([caption for _, caption in shapes[:3]]).hidden
    reference = stack.unet.eval()
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.02 * parameter.std().nan_to_num(0.0) * torch.randn(parameter.shape, generator=g))
    return {"stack": stack, "latents": latents, "hidden": hidden, "policy": policy, "reference": reference,
            "ddim": DDIMScheduler.from_config(stack.noise_scheduler.config)}


class InverseSchedulerV020:
    """diffusers 0.20.0's DDIMInverseScheduler (src/diffusers/schedulers/scheduling_ddim_inverse.py at
    v0.20.0, lines 274-293 and 338-343), the version JaydenLyh/SmPO pins: ``set_timesteps(n)``
    builds the leading grid k * T/n + steps_offset and rolls it by one, first entry = second - T/n
    (SD1.5, n = 5: -199, 1, 201, 401, 601); ``step(eps, t, x)`` goes from the level of t (t < 0:
    the initial alpha, alphas_cumprod[0] when set_alpha_to_one is false) to the level t + T/n.
    Rebuilt here from those lines; diffusers 0.22 (PR #5145) changed both."""

    def __init__(self, config, alphas_cumprod: torch.Tensor, num_inference_steps: int):
        self.ratio = config.num_train_timesteps // num_inference_steps
        grid = np.arange(num_inference_steps) * self.ratio + config.steps_offset
        grid = np.roll(grid, 1)
        grid[0] = grid[1] - self.ratio
        self.timesteps = torch.from_numpy(grid)
        self.alphas = alphas_cumprod
        self.initial = torch.tensor(1.0) if config.set_alpha_to_one else alphas_cumprod[0]

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        a_from = self.alphas[t] if t >= 0 else self.initial
        a_to = self.alphas[t + self.ratio]
        x0_hat = (x - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
        return a_to ** 0.5 * x0_hat + (1 - a_to) ** 0.5 * eps


def official_inversion(unet, inverse_scheduler, latents: torch.Tensor, hidden: torch.Tensor, t: int) -> torch.Tensor:
    """``train.py`` lines 1000-1022: from the clean latents, every inverse-scheduler point below the
    training timestep t: a prediction at the current latents, a step, a second prediction at the
    stepped latents with the same timestep, and the step again with the mean of the two."""
    noisy = latents.clone()
    with torch.no_grad():
        for point in inverse_scheduler.timesteps[inverse_scheduler.timesteps < t]:
            point_batch = torch.full((latents.shape[0],), int(point))
            noise_pred = unet(noisy, point_batch, hidden).sample
            noisy_1 = _step(inverse_scheduler, noise_pred, int(point), noisy)
            noise_pred_1 = unet(noisy_1, point_batch, hidden).sample
            noisy = _step(inverse_scheduler, (noise_pred + noise_pred_1) / 2, int(point), noisy)
    return noisy


def _step(scheduler, eps, t, x):
    out = scheduler.step(eps, t, x)
    return out.prev_sample if hasattr(out, "prev_sample") else out


def official_smpo_micro_step(models, inverse_scheduler, pair: int, t: int, score_0: float, score_1: float) -> torch.Tensor:
    """One official micro-step (one pair per device): order by PickScore, invert both images with the
    policy, noise = (x~ - sqrt(a_t) x_0) / sqrt(1 - a_t), policy and reference errors at (x~, t), loss."""
    latents, hidden = models["latents"], models["hidden"][pair:pair + 1]
    swapped, prob = official_soft_label(score_0, score_1)
    start_latents = latents[[pair + 3, pair] if swapped else [pair, pair + 3]]
    encoder_hidden_states = hidden.repeat(2, 1, 1)
    noisy_latents = official_inversion(models["policy"], inverse_scheduler, start_latents, encoder_hidden_states, t)
    alpha_prod_t = models["stack"].noise_scheduler.alphas_cumprod[t]
    noise = (noisy_latents - start_latents * alpha_prod_t ** 0.5) / (1 - alpha_prod_t) ** 0.5
    timesteps = torch.full((2,), t)
    model_pred = models["policy"](noisy_latents, timesteps, encoder_hidden_states).sample
    with torch.no_grad():
        ref_pred = models["reference"](noisy_latents, timesteps, encoder_hidden_states).sample
    return official_smpo_loss(model_pred, ref_pred, noise, prob, BETA_SD15)


def diffpo_smpo_micro_step(models, timesteps: list[int], scores: list[tuple[float, float]], grid: str):
    """What ``offline_pairs`` does for ``method: smpo`` on the same 3 pairs (stored order): the
    current policy inverts [winners; losers] (``invert_to_timesteps``, 5 steps, one re-prediction
    averaged with the plain one), target ``inversion_target``, errors, ``soft_labels`` + ``smpo_loss``."""
    from diffpo.models.loading import unet_denoiser

    stack = models["stack"]
    t2 = torch.tensor(timesteps).repeat(2)
    conditioning = {"encoder_hidden_states": models["hidden"].repeat(2, 1, 1)}
    policy, reference = unet_denoiser(models["policy"]), unet_denoiser(models["reference"])
    noisy = invert_to_timesteps(policy, models["ddim"], models["latents"], conditioning, t2, 5, grid=grid)
    target = inversion_target(noisy, models["latents"], stack.noise_scheduler.alphas_cumprod[t2])
    errors = batch_errors(policy, reference, noisy, t2, conditioning, target)
    p = soft_labels(torch.tensor([s[0] for s in scores]), torch.tensor([s[1] for s in scores]))
    loss, _ = smpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, p, beta=BETA_SD15, gamma=10.0)
    return loss, noisy


SMPO_TIMESTEPS = [150, 550, 950]
SMPO_SCORES = [(0.2231, 0.2010), (0.1874, 0.2402), (0.2650, 0.1300)]


def test_smpo_micro_step_on_the_tiny_model_matches_the_official_code_with_current_diffusers(tiny_models):
    """Same images, captions, policy, reference, timesteps and PickScores: the official micro-step
    with diffusers' current DDIMInverseScheduler (0.22 and later) and diffpo with
    ``inversion_grid="shared"`` agree (fp32: the scheduler's x0-then-noise arithmetic against diffpo's
    float64 step coefficients)."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(tiny_models["stack"].noise_scheduler.config)
    inverse.set_timesteps(5)  # train.py line 881 (SD1.5)
    assert inverse.timesteps.tolist() == [1, 201, 401, 601, 801]
    official = torch.stack([official_smpo_micro_step(tiny_models, inverse, i, t, *s)
                            for i, (t, s) in enumerate(zip(SMPO_TIMESTEPS, SMPO_SCORES))])
    ours, noisy = diffpo_smpo_micro_step(tiny_models, SMPO_TIMESTEPS, SMPO_SCORES, grid="shared")
    for i, t in enumerate(SMPO_TIMESTEPS):  # x~ of pair i's PickScore winner (pair 1 is stored reversed)
        first = i + 3 if i == 1 else i
        start = tiny_models["latents"][[first]]
        x_official = official_inversion(tiny_models["policy"], inverse, start, tiny_models["hidden"][i:i + 1], t)
        torch.testing.assert_close(noisy[[first]], x_official, rtol=0, atol=2e-5)
    relative = ((official - ours).abs() / official.abs()).max().item()
    print(f"\nSmPO micro-step, diffusers >= 0.22 inverse scheduler: official {official.tolist()}"
          f"\n  diffpo (shared grid) {ours.tolist()}\n  max relative difference {relative:.2e}")
    assert relative < 2e-4
    assert (official - math.log(2)).abs().min() > 1e-3  # the perturbed policy moves the loss off log 2


def _landing_level(x_tilde: torch.Tensor, x0: torch.Tensor, alphas: torch.Tensor) -> int:
    """With a denoiser that predicts zero noise every inversion step scales x by sqrt(a_to / a_from),
    so x~ = sqrt(a_L / a_0) x_0: the level L the inversion ended on."""
    a_level = (x_tilde / x0).mean() ** 2 * alphas[0]
    return int((alphas - a_level).abs().argmin())


def test_official_inversion_under_its_pinned_diffusers_lands_above_t_where_diffpo_lands_on_or_below(tiny_models):
    """The inversion target differs from both diffpo grids. A zero-noise denoiser exposes the level
    x~ ends on: diffpo ``per_sample`` lands on t, ``shared`` (and the official code under diffusers
    >= 0.22) on the last point 1, 201, ..., 801 below t, the official code under the diffusers 0.20.0
    it pins on the first point at or above t (801 at most), with the model called at the point
    below (t = -199 for the first step)."""
    from diffusers import DDIMInverseScheduler

    config = tiny_models["stack"].noise_scheduler.config
    alphas = tiny_models["stack"].noise_scheduler.alphas_cumprod
    x0 = torch.full((1, 4, 2, 2), 0.5)
    calls = []

    class ZeroNoise:
        def __call__(self, x, t, encoder_hidden_states):
            calls.append(int(t[0]))
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    old = InverseSchedulerV020(config, alphas, 5)
    assert old.timesteps.tolist() == [-199, 1, 201, 401, 601]
    new = DDIMInverseScheduler.from_config(config)
    new.set_timesteps(5)
    levels = {"per_sample": [], "shared": [], "official_current": [], "official_0.20": []}
    for t in [150, 350, 550, 750, 950]:
        for grid in ("per_sample", "shared"):
            x = invert_to_timesteps(zero, tiny_models["ddim"], x0, {}, torch.tensor([t]), 5, grid=grid)
            levels[grid].append(_landing_level(x, x0, alphas))
        levels["official_current"].append(_landing_level(official_inversion(ZeroNoise(), new, x0, None, t), x0, alphas))
        calls.clear()
        levels["official_0.20"].append(_landing_level(official_inversion(ZeroNoise(), old, x0, None, t), x0, alphas))
    print(f"\nlevel of x~ for t = 150, 350, 550, 750, 950: {levels}")
    assert levels["per_sample"] == [150, 350, 550, 750, 950]
    assert levels["shared"] == levels["official_current"] == [1, 201, 401, 601, 801]
    assert levels["official_0.20"] == [201, 401, 601, 801, 801]
    assert calls == [-199, -199, 1, 1, 201, 201, 401, 401, 601, 601]  # t = 950: model timesteps, 2 per step


def test_smpo_micro_step_under_the_pinned_diffusers_differs_from_both_diffpo_grids(tiny_models):
    """The whole official micro-step with the 0.20.0 inverse scheduler gives another loss than either
    diffpo grid on the same batch: the difference is in x~ and tau, not a convention."""
    old = InverseSchedulerV020(tiny_models["stack"].noise_scheduler.config,
                               tiny_models["stack"].noise_scheduler.alphas_cumprod, 5)
    official = torch.stack([official_smpo_micro_step(tiny_models, old, i, t, *s)
                            for i, (t, s) in enumerate(zip(SMPO_TIMESTEPS, SMPO_SCORES))])
    shared, _ = diffpo_smpo_micro_step(tiny_models, SMPO_TIMESTEPS, SMPO_SCORES, grid="shared")
    per_sample, _ = diffpo_smpo_micro_step(tiny_models, SMPO_TIMESTEPS, SMPO_SCORES, grid="per_sample")
    print(f"\nSmPO micro-step: official (diffusers 0.20.0) {official.tolist()}\n  diffpo shared {shared.tolist()}"
          f"\n  diffpo per_sample {per_sample.tolist()}")
    for ours in (shared, per_sample):
        assert ((official - ours).abs() / official.abs()).max() > 1e-2


# ---- Diffusion-DRO ----------------------------------------------------------------------------------


def official_dro_loss(unet, unet_ref, noise_scheduler, x0_expert, eps_expert, t, xt_policy, eps_policy, c,
                      margin: float) -> torch.Tensor:
    """basiclab/DiffusionDRO ``train.py`` lines 744-768: the expert noised at the buffer entry's t,
    [experts; online samples] through the reference and the policy, per-sample errors against
    [fresh noise; the lagged prediction], hinge on the difference of the reference-relative errors."""
    xt_expert = noise_scheduler.add_noise(x0_expert, eps_expert, t)
    xt = torch.cat([xt_expert, xt_policy], dim=0)
    eps = torch.cat([eps_expert, eps_policy], dim=0)
    t = torch.cat([t, t], dim=0)
    c = torch.cat([c, c], dim=0)
    with torch.no_grad():
        pred_eps_ref = unet_ref(xt, t, c).sample
    losses0 = (pred_eps_ref - eps).square().mean(dim=[1, 2, 3])
    loss_expert0, loss_policy0 = losses0.chunk(2)
    pred_eps = unet(xt, t, c).sample
    losses = (pred_eps - eps).square().mean(dim=[1, 2, 3])
    loss_expert, loss_policy = losses.chunk(2)
    diff = (loss_expert - loss_expert0) - (loss_policy - loss_policy0)
    return torch.maximum(diff + margin, torch.zeros_like(diff)).mean()


def test_dro_loss_from_errors_equals_the_official_formula():
    g = torch.Generator().manual_seed(25)
    errors = [torch.rand(8, generator=g) * 0.2 for _ in range(4)]
    official_diff = (errors[0] - errors[1]) - (errors[2] - errors[3])
    official = torch.maximum(official_diff + 0.001, torch.zeros_like(official_diff)).mean()
    ours, metrics = dro_loss(*errors, margin=0.001)
    assert 0 < metrics["active"].item() < 1  # both sides of the hinge in this batch
    assert (official - ours.mean()).abs().item() == 0.0


def test_dro_micro_step_on_the_tiny_model_equals_the_official_code(tiny_models):
    """One replay-buffer draw: 3 experts, their captions, online latents x_t with the lagged copy's
    predictions as targets, shared jittered timesteps. The official micro-step and diffpo's (the
    lines of ``online.dro_micro_step`` after the draw: add_noise, ``batch_errors``, ``dro_loss``)
    on the same tensors."""
    from diffpo.models.loading import unet_denoiser

    stack = tiny_models["stack"]
    g = torch.Generator().manual_seed(7)
    experts = tiny_models["latents"][:3]
    t = torch.tensor([917, 433, 38])
    eps_expert = torch.randn(experts.shape, generator=g)
    lagged = copy.deepcopy(tiny_models["policy"])
    with torch.no_grad():
        for parameter in lagged.parameters():
            parameter.add_(0.01 * parameter.std().nan_to_num(0.0) * torch.randn(parameter.shape, generator=g))
        xt_policy = stack.noise_scheduler.add_noise(tiny_models["latents"][3:], torch.randn(experts.shape, generator=g), t)
        eps_policy = lagged(xt_policy, t, tiny_models["hidden"]).sample
    official = official_dro_loss(tiny_models["policy"], tiny_models["reference"], stack.noise_scheduler, experts,
                                 eps_expert, t, xt_policy, eps_policy, tiny_models["hidden"], margin=0.001)

    noisy = torch.cat([stack.noise_scheduler.add_noise(experts, eps_expert, t), xt_policy])
    target = torch.cat([prediction_target("epsilon", stack.noise_scheduler, experts, eps_expert, t).float(),
                        eps_policy.float()])
    conditioning = {"encoder_hidden_states": tiny_models["hidden"].repeat(2, 1, 1)}
    errors = batch_errors(unet_denoiser(tiny_models["policy"]), unet_denoiser(tiny_models["reference"]), noisy,
                          torch.cat([t, t]), conditioning, target)
    ours, metrics = dro_loss(errors.policy_w, errors.ref_w, errors.policy_l, errors.ref_l, margin=0.001)
    print(f"\nDRO micro-step: official {official.item()}, diffpo {ours.mean().item()}, "
          f"difference {(official - ours.mean()).abs().item()}")
    assert official.item() > 0.001  # the policy differs from the reference: not the initial m
    assert (official - ours.mean()).abs().item() == 0.0


def official_buffer_trajectory(denoise, config, x_T: torch.Tensor, timesteps: torch.Tensor):
    """basiclab/DiffusionDRO ``misc/patch.py`` DPMSolverMultistepScheduler with per-sample timesteps
    (T, B), as the StableDiffusionPipeline runs it for the replay buffer: ``set_timesteps`` is the
    base class's on column 0 (so ``sigmas`` are sample 0's), then each sample steps alone with its own
    column as ``timesteps`` and its own solver state (model outputs, lower-order count, step index)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(config)
    scheduler.set_timesteps(timesteps=timesteps[:, 0].tolist())
    states = [{"outputs": [None] * scheduler.config.solver_order, "lower": 0, "index": None, "begin": None}
              for _ in range(x_T.shape[0])]
    x, seen = x_T, []
    for i in range(timesteps.shape[0]):
        t = timesteps[i]
        eps = denoise(x, t, None)
        seen.append(x)
        stepped = []
        for b, state in enumerate(states):
            scheduler.timesteps = timesteps[:, b]
            scheduler.model_outputs, scheduler.lower_order_nums = state["outputs"], state["lower"]
            scheduler._step_index, scheduler._begin_index = state["index"], state["begin"]
            stepped.append(scheduler.step(eps[b], t[b], x[b]).prev_sample)
            state.update(lower=scheduler.lower_order_nums, index=scheduler._step_index, begin=scheduler._begin_index)
        x = torch.stack(stepped)
    return torch.stack(seen)


def test_dro_online_sampler_official_steps_every_sample_with_the_first_samples_noise_levels():
    """Jittered grids (T, B) = (20, 3) with offsets 0, 17, 49 (buffer_perturb_timesteps): the official
    sampler and diffpo's ``sample_dpm_solver`` record the same latents for sample 0 and for a batch
    whose offsets are all equal, but not for samples whose offset differs from sample 0's."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.from_pretrained(TINY, subfolder="scheduler").config
    scheduler = DDPMScheduler.from_config(config)
    denoise = lambda x, t, c: 0.4 * x + 0.1 * (t.float() / 1000).view(-1, 1, 1, 1)  # noqa: E731
    x_T = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    grid = (torch.arange(20) * 50).flip(0)[:, None]
    for offsets, same in (([0, 17, 49], [True, False, False]), ([17, 17, 17], [True, True, True])):
        timesteps = grid + torch.tensor(offsets)[None, :]
        official = official_buffer_trajectory(denoise, config, x_T, timesteps)
        ours = sample_dpm_solver(denoise, scheduler, x_T, {}, timesteps).latents
        gaps = (official - ours).abs().amax(dim=(0, 2, 3, 4))
        print(f"\nDRO sampler, offsets {offsets}: max |official - diffpo| per sample {gaps.tolist()}")
        for b, equal in enumerate(same):
            assert (gaps[b] < 1e-4) == equal


def test_dro_negatives_sampled_with_guidance_push_the_conditional_prediction_towards_the_unconditional():
    """Diagnosis of the colour-match drop (docs/methods.md): the buffer stores the lagged copy's
    *guided* prediction eps_u + g (eps_c - eps_u) as the negative's target, while the policy is trained
    on its conditional prediction eps_c (the behaviour before ``online.negative_target: conditional``
    became the default; ``guided`` keeps it). At initialisation (policy = reference = lagged) the negative
    term's gradient step on the policy's prediction is then 2 (g - 1) / d * (eps_u - eps_c): straight
    towards the unconditional prediction, i.e. away from the caption. With the official g = 1 the
    negative target is eps_c itself and that term has no first-order gradient."""
    g = torch.Generator().manual_seed(4)
    eps_c, eps_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    d = eps_c[0].numel()
    expert = torch.full((2,), 0.1)  # equal policy and reference errors on the experts: d_exp = 0
    for guidance in (1.0, 5.0):
        # guidance 1: no classifier-free guidance, the stored prediction is the conditional one
        target = eps_c.clone() if guidance == 1.0 else eps_u + guidance * (eps_c - eps_u)
        prediction = eps_c.clone().requires_grad_(True)
        loss, metrics = dro_loss(expert, expert, per_sample_error(prediction, target), per_sample_error(eps_c, target))
        assert metrics["active"].item() == 1.0  # diff = 0: the hinge is at m, active
        loss.sum().backward()
        step = -prediction.grad
        if guidance == 1.0:
            assert torch.equal(step, torch.zeros_like(step))
        else:
            torch.testing.assert_close(step, 2 * (guidance - 1) / d * (eps_u - eps_c))


# ---- a probe of the SmPO gradient direction (slow: about 100 s on 2 CPU cores) -------------------


@pytest.mark.slow
def test_smpo_gradient_direction_at_initialisation_against_diffusion_dpo(tiny_models):
    """Which inversion target carries the preference signal? 12 captions x 4 deterministic samples of
    the bundled model (DDIM 20 steps, guidance 5, as the quickstart), best-vs-worst pairs by JPEG
    compressibility, soft labels on [-1.5, -1.0]. At initialisation (policy = reference) the loss
    gradient over the whole UNet, summed over 6 draws of per-pair timesteps, for Diffusion-DPO (fresh
    noise, beta 2000) and SmPO (beta 2000, gamma 10) with x~ from diffpo's ``per_sample`` and
    ``shared`` grids and from the official code under diffusers 0.20.0. Compared by the share of
    parameters whose gradient signs agree (2 * agree - 1: what Adam's first steps follow) and by
    cosine. Measured: Diffusion-DPO against itself on independent draws sign 0.55, cos 0.85; SmPO
    ``per_sample`` against Diffusion-DPO sign 0.05, cos 0.03; ``shared`` sign 0.35, cos 0.39;
    official (0.20.0) sign 0.15, cos 0.17."""
    from diffusers import DDIMScheduler

    import diffpo.rewards as rewards
    from diffpo.data.shapes import sample_shapes
    from diffpo.kernel.inversion import sample_from
    from diffpo.models.loading import unet_denoiser

    stack, unet = tiny_models["stack"], copy.deepcopy(tiny_models["reference"])
    unet.requires_grad_(True)
    denoise = unet_denoiser(unet)
    ddim = DDIMScheduler.from_config(stack.noise_scheduler.config)
    captions = [caption for _, caption in sample_shapes(12, size=stack.native_resolution, seed=11)]
    per_caption = 4
    repeated = [c for c in captions for _ in range(per_caption)]
    cond = stack.family.unet_conditioning(stack.encode_prompts(repeated))
    uncond = stack.family.unet_conditioning(stack.encode_prompts([""] * len(repeated)))
    x_T = torch.randn(len(repeated), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = sample_from(denoise, ddim, x_T, cond, uncond, guidance=5.0, num_inference_steps=20)[-1]
        images = (stack.vae.decode(x0 / stack.vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    reward = rewards.load("jpeg-compressibility")(images, repeated).view(len(captions), per_caption)
    x0 = x0.view(len(captions), per_caption, *x0.shape[1:])
    rows = torch.arange(len(captions))
    best, worst = reward.argmax(1), reward.argmin(1)
    latents = torch.cat([x0[rows, best], x0[rows, worst]])
    p = soft_labels(reward[rows, best], reward[rows, worst], -1.5, -1.0)
    conditioning = stack.family.unet_conditioning(stack.encode_prompts(captions).repeat_pairs())
    n, alphas = len(captions), stack.noise_scheduler.alphas_cumprod
    params = list(unet.parameters())
    v020 = InverseSchedulerV020(stack.noise_scheduler.config, alphas, 5)

    def gradient(noisy, t2, target, scale):
        errors_w, errors_l = per_sample_error(denoise(noisy, t2, conditioning), target).chunk(2)
        # at initialisation every logit is 0: the loss gradient is scale / 2 * (grad e_w - grad e_l)
        grads = torch.autograd.grad((scale * 0.5 * (errors_w - errors_l)).mean(), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(q) if g is None else g).flatten() for q, g in zip(params, grads)])

    def smpo(noisy, t2):
        return gradient(noisy, t2, inversion_target(noisy, latents, alphas[t2]), 0.5 * BETA_SD15 * 10 * (2 * p - 1))

    totals = {}
    for draw in range(6):
        g = torch.Generator().manual_seed(100 + draw)
        t = torch.randint(0, 1000, (n,), generator=g)
        t2 = t.repeat(2)
        noise = torch.randn(n, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
        with torch.no_grad():
            x_per_sample = invert_to_timesteps(denoise, ddim, latents, conditioning, t2, 5, grid="per_sample")
            x_shared = invert_to_timesteps(denoise, ddim, latents, conditioning, t2, 5, grid="shared")
            hidden = conditioning["encoder_hidden_states"]
            pairs = [official_inversion(unet, v020, latents[[i, n + i]], hidden[[i, n + i]], int(t[i])) for i in range(n)]
            x_official = torch.cat([torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])])
        draws = {"dpo": gradient(stack.noise_scheduler.add_noise(latents, noise, t2), t2, noise, 0.5 * BETA_SD15),
                 "per_sample": smpo(x_per_sample, t2), "shared": smpo(x_shared, t2), "official_0.20": smpo(x_official, t2)}
        # a second Diffusion-DPO gradient on other noise and timesteps: the agreement to expect
        t_other = torch.randint(0, 1000, (n,), generator=g).repeat(2)
        other = torch.randn(n, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
        draws["dpo_other"] = gradient(stack.noise_scheduler.add_noise(latents, other, t_other), t_other, other, 0.5 * BETA_SD15)
        totals = {k: totals.get(k, 0) + v for k, v in draws.items()}
    sign = {k: float((totals[k].sign() * totals["dpo"].sign())[(totals[k] != 0) & (totals["dpo"] != 0)].mean())
            for k in totals}
    cos = {k: float(F.cosine_similarity(totals[k], totals["dpo"], dim=0)) for k in totals}
    print(f"\nagainst Diffusion-DPO: sign {sign}\n  cosine {cos}")
    assert cos["dpo_other"] > 0.8
    assert sign["shared"] > sign["official_0.20"] > sign["per_sample"] + 0.05
    assert abs(cos["per_sample"]) < 0.1
