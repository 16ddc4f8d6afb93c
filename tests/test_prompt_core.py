"""The rewriter LM (tiny model), Sem-DPO weights and loss, sequence log-probs and masking, embeddings."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from diffpo.objectives.semdpo import semdpo_loss
from diffpo.prompt.lm import (
    RewriteTemplate,
    build_tiny_lm,
    clean_rewrite,
    completion_batch,
    encode_input,
    generate_rewrites,
    load_rewriter,
    render_inputs,
    sequence_logprobs,
)
from diffpo.prompt.semantic import mean_weight_scale, semantic_weights


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny LM ops: threads only spin


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_lm(seed=0)


# ---- Sem-DPO math ------------------------------------------------------------------------------


def test_semantic_weights_match_hand_values():
    cos = torch.tensor([1.0, 0.5, 0.0, -1.0])
    expected = torch.tensor([1.0, math.exp(-1.0), math.exp(-2.0), math.exp(-4.0)])
    assert torch.allclose(semantic_weights(cos, alpha=2.0), expected)
    assert torch.equal(semantic_weights(cos, alpha=0.0), torch.ones(4))
    with pytest.raises(ValueError, match="alpha"):
        semantic_weights(cos, alpha=-1.0)


def test_mean_weight_scale_makes_the_mean_weight_one():
    cos = [1.0, 0.5, 0.0]
    assert mean_weight_scale(cos, alpha=2.0) == pytest.approx(3.0 / (1.0 + math.exp(-1.0) + math.exp(-2.0)))
    assert mean_weight_scale(cos, alpha=0.0) == 1.0
    # at large alpha the raw weights are tiny, the normalised ones are not
    scale = mean_weight_scale([0.4, 0.5], alpha=30.0)
    assert (scale * semantic_weights(torch.tensor([0.4, 0.5]), alpha=30.0)).mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        mean_weight_scale([], alpha=1.0)


def test_semdpo_loss_is_weighted_dpo():
    lp_w, lp_l = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_w, ref_l = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    beta = 0.1
    # Rafailov et al. Eq. 7 by hand: -log sigmoid(beta ((lp_w - ref_w) - (lp_l - ref_l)))
    margins = [beta * ((-10 + 11) - (-12 + 11)), beta * ((-5 + 5) - (-4 + 5))]
    plain = torch.tensor([math.log1p(math.exp(-m)) for m in margins])
    loss, metrics = semdpo_loss(lp_w, lp_l, ref_w, ref_l, torch.ones(2), beta=beta)
    assert torch.allclose(loss, plain)
    assert metrics["acc"].item() == 0.5  # first pair right, second wrong
    weights = semantic_weights(torch.tensor([0.9, 0.2]), alpha=1.5)
    weighted, _ = semdpo_loss(lp_w, lp_l, ref_w, ref_l, weights, beta=beta)
    assert torch.allclose(weighted, weights * plain)
    assert torch.allclose(metrics["reward_margin"], torch.tensor(margins).mean())


def test_semdpo_loss_is_log2_when_policy_is_reference():
    logp = torch.tensor([-3.0, -7.5, -1.25])
    loss, metrics = semdpo_loss(logp, logp.flip(0), logp, logp.flip(0), torch.ones(3), beta=0.1)
    assert torch.equal(loss, torch.full((3,), math.log(2.0)))
    assert metrics["acc"].item() == 0.5


# ---- tokenizer, rendering, masking ---------------------------------------------------------------


def test_tiny_tokenizer_round_trips_and_renders(tiny):
    _, tokenizer = tiny
    text = "A cat, on a mat! ~ {x} [1/2] 100% \"quoted\"\ttab"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    rendered = render_inputs(tokenizer, ["a red cube"], RewriteTemplate(system="Be vivid."))[0]
    assert rendered.startswith("<|im_start|>system\nBe vivid.<|im_end|>")
    assert rendered.endswith("a red cube<|im_end|>\n<|im_start|>assistant\n")
    plain = render_inputs(tokenizer, ["a red cube"], RewriteTemplate(use_chat_template=False))[0]
    assert plain.endswith("keeping its subject: a red cube\nRewritten prompt:")
    with pytest.raises(ValueError, match="placeholder"):
        RewriteTemplate(instruction="no slot")


def test_completion_mask_covers_exactly_the_completion(tiny):
    _, tokenizer = tiny
    inputs = render_inputs(tokenizer, ["a cat", "a very long prompt about a lighthouse"], RewriteTemplate())
    completions = ["a fluffy cat", "x"]
    batch = completion_batch(tokenizer, inputs, completions)
    for row, (text, completion) in enumerate(zip(inputs, completions)):
        prompt_ids = encode_input(tokenizer, text)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = len(prompt_ids) + len(completion_ids)
        expected = torch.zeros(batch["input_ids"].shape[1], dtype=torch.long)
        expected[len(prompt_ids):length] = 1
        assert torch.equal(batch["completion_mask"][row], expected)
        assert batch["input_ids"][row, :length].tolist() == prompt_ids + completion_ids
        assert batch["attention_mask"][row].sum().item() == length
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()


def test_sequence_logprobs_match_a_per_token_loop(tiny):
    model, tokenizer = tiny
    inputs = render_inputs(tokenizer, ["a cat", "a lighthouse at dusk", "x"], RewriteTemplate())
    completions = ["a fluffy cat in the sun", "y", "an extremely long and detailed completion text"]
    batch = completion_batch(tokenizer, inputs, completions)
    with torch.no_grad():
        batched = sequence_logprobs(model, **batch)
        for row, (text, completion) in enumerate(zip(inputs, completions)):
            prompt_ids = encode_input(tokenizer, text)
            ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            expected = sum(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]].item() for t in range(len(prompt_ids), len(ids)))
            assert batched[row].item() == pytest.approx(expected, abs=1e-4)
        # A row's value does not depend on the padding its batch-mates force on it.
        alone = completion_batch(tokenizer, inputs[1:2], completions[1:2])
        assert sequence_logprobs(model, **alone)[0].item() == pytest.approx(batched[1].item(), abs=1e-5)
    assert batched.dtype == torch.float32


def test_completion_batch_truncates_to_max_length(tiny):
    _, tokenizer = tiny
    batch = completion_batch(tokenizer, ["p" * 40], ["c" * 40], max_length=50)
    assert batch["input_ids"].shape == (1, 50)
    assert batch["completion_mask"].sum().item() == 10  # the completion is cut, the input kept
    with pytest.raises(ValueError, match="one completion per input"):
        completion_batch(tokenizer, ["a", "b"], ["c"])


# ---- generation ------------------------------------------------------------------------------


def test_generate_rewrites_shape_and_reproducibility(tiny):
    model, tokenizer = tiny
    prompts = ["a red cube", "a dog on the beach at sunset", "x"]
    state = torch.get_rng_state()
    first = generate_rewrites(model, tokenizer, prompts, n=3, max_new_tokens=12, seed=7, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert len(first) == 3 and all(len(group) == 3 and all(isinstance(t, str) for t in group) for group in first)
    assert first == generate_rewrites(model, tokenizer, prompts, n=3, max_new_tokens=12, seed=7, batch_size=2)
    assert first != generate_rewrites(model, tokenizer, prompts, n=3, max_new_tokens=12, seed=8, batch_size=2)
    greedy = generate_rewrites(model, tokenizer, prompts[:1], n=2, temperature=0, max_new_tokens=8)
    assert len(greedy[0]) == 2 and greedy[0][0] == greedy[0][1]


def test_clean_rewrite_takes_the_first_line_without_echo():
    assert clean_rewrite('  Rewritten prompt: "a cat, golden hour"\nExplanation: ...') == "a cat, golden hour"
    assert clean_rewrite("\n\n**Improved prompt:** a misty forest\nmore") == "a misty forest"
    assert clean_rewrite("a plain answer") == "a plain answer"
    assert clean_rewrite("   ") == ""


# ---- loading ----------------------------------------------------------------------------------


def test_load_rewriter_from_a_saved_folder_and_errors(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    loaded, loaded_tokenizer = load_rewriter(str(tmp_path / "lm"))
    batch = completion_batch(tokenizer, render_inputs(tokenizer, ["a cat"], RewriteTemplate()), ["a big cat"])
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(loaded, **batch), sequence_logprobs(model, **batch))
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.chat_template == tokenizer.chat_template
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.gguf").write_bytes(b"")
    (tmp_path / "two" / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        load_rewriter(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="not an existing path"):
        load_rewriter(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_rewriter(str(tmp_path / "empty"))


def test_importing_diffpo_prompt_stays_light():
    code = "import sys, diffpo.prompt; print('transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---- embeddings -------------------------------------------------------------------------------


def test_embedder_ranks_paraphrases_above_unrelated_text():
    from diffpo.prompt.semantic import load_embedder, paired_cosine

    embedder = load_embedder()
    vectors = embedder.encode(["a cat sitting on a mat", "a kitten resting on a rug", "quarterly tax filing deadline"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    cos = paired_cosine(embedder, ["a cat sitting on a mat"] * 2, ["a kitten resting on a rug", "quarterly tax filing deadline"])
    assert cos[0] > cos[1] + 0.3
