import pytest
import torch

from fastmem import tasks
from fastmem import value as fv
from fastmem.errors import ParameterError
from fastmem.models import input_embedding, output_embedding


def _pairs(tokenizer, n_words=4, seed=0):
    bindings = tasks.make_bindings(tasks.nonce_words(n_words, seed), tasks.CONTEXTS["train"],
                                   tasks.single_token_labels(tokenizer), seed)
    targets = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in bindings]))
    return [tasks.write_prompt(b) for b in bindings], [tasks.read_prompt(b) for b in bindings], targets


@pytest.fixture(scope="module")
def smol_states(smollm2):
    model, tokenizer, _ = smollm2
    writes, reads, targets = _pairs(tokenizer)
    return fv.answer_states(model, tokenizer, writes), fv.answer_states(model, tokenizer, reads), targets, writes, reads


@pytest.mark.parametrize("fixture", ["smollm2", "tiny_neox", "tiny_t5"])
def test_value_equals_minus_gradient(request, fixture):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    writes, _, targets = _pairs(tokenizer)
    states = fv.answer_states(model, tokenizer, writes)
    closed_form = fv.memory_value(model, states.head_input, targets)
    assert (closed_form - fv.autograd_value(model, states.head_input, targets)).abs().max() < 1e-4


def test_input_embedding_version_differs_only_when_untied(smollm2, tiny_neox):
    for (model, tokenizer, info) in (smollm2, tiny_neox):
        writes, _, targets = _pairs(tokenizer, n_words=2)
        h = fv.answer_states(model, tokenizer, writes).head_input
        gap = (fv.memory_value(model, h, targets) - fv.memory_value(model, h, targets, input_embedding(model))).abs().max()
        assert (gap == 0) if info.tied_embeddings else (gap > 1e-3)


def test_batched_states_match_one_prompt_at_a_time(smollm2, smol_states):
    model, tokenizer, _ = smollm2
    batched, _, _, writes, _ = smol_states
    single = fv.answer_states(model, tokenizer, writes[:3], batch_size=1)
    assert torch.allclose(batched.head_input[:3], single.head_input, atol=1e-3)
    assert torch.equal(batched.logits[:3].argmax(-1), single.logits.argmax(-1))


@pytest.mark.parametrize("site", fv.HEAD_SITES)
def test_cached_sweep_matches_real_forward_hooks(smollm2, smol_states, site):
    model, tokenizer, _ = smollm2
    states, _, targets, writes, _ = smol_states
    values = fv.memory_value(model, states.head_input, targets)
    alpha = 8.0 if site == "post_norm" else 256.0
    cached = fv.sweep_head(model, states, values, targets, [alpha], site)["log_p_target"][0]
    batch = fv.encode_prompts(model, tokenizer, writes)
    with torch.no_grad(), fv.injected(model, site, alpha * values):
        logits = model(**batch).logits[:, -1, :]
    hooked = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(cached, hooked, atol=2e-3)


def test_zero_injection_is_bit_identical_and_weights_untouched(smollm2, smol_states):
    model, tokenizer, _ = smollm2
    _, _, _, writes, _ = smol_states
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = fv.encode_prompts(model, tokenizer, writes)
    with torch.no_grad():
        plain = model(**batch).logits
        for site in (*fv.HEAD_SITES, 10):
            with fv.injected(model, site, torch.zeros(len(writes), model.config.hidden_size)):
                assert torch.equal(model(**batch).logits, plain)
        with fv.injected(model, "post_norm", torch.ones(len(writes), model.config.hidden_size)):
            assert not torch.equal(model(**batch).logits, plain)
    assert torch.equal(model(**batch).logits, plain), "hook left behind"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_small_step_follows_first_order_prediction(smollm2, smol_states):
    model, _, _ = smollm2
    states, _, targets, _, _ = smol_states
    values = fv.memory_value(model, states.head_input, targets)
    alpha = 1e-3
    moved = fv.sweep_head(model, states, values, targets, [0.0, alpha], "post_norm")["log_p_target"]
    predicted = alpha * (values * values).sum(-1)
    assert torch.allclose(moved[1] - moved[0], predicted, rtol=0.05, atol=1e-6)


def test_iterated_value_lowers_the_loss_more_than_one_step(smollm2, smol_states):
    model, _, _ = smollm2
    states, _, targets, _, _ = smol_states
    one = fv.iterated_value(model, states.head_input, targets, 4.0, 1)
    five = fv.iterated_value(model, states.head_input, targets, 4.0, 5)
    assert torch.allclose(one, 4.0 * fv.memory_value(model, states.head_input, targets), atol=1e-5)
    log_p = fv.sweep_head(model, states, five, targets, [1.0], "post_norm")["log_p_target"][0]
    log_p_one = fv.sweep_head(model, states, one, targets, [1.0], "post_norm")["log_p_target"][0]
    assert (log_p > log_p_one).all()


def test_min_norm_step_makes_the_target_the_argmax_with_margin(smollm2, smol_states):
    model, _, _ = smollm2
    states, _, targets, _, _ = smol_states
    step = fv.min_norm_value(model, states.head_input, targets, margin=1.0)
    logits = fv.head_logits(model, states.head_input + step)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    logits.scatter_(1, targets[:, None], -torch.inf)
    assert (target_logit - logits.max(-1).values >= 1.0 - 1e-3).all()
    assert (step.norm(dim=-1) < fv.iterated_value(model, states.head_input, targets, 4.0, 5).norm(dim=-1)).all()


def test_top_k_value_with_full_vocabulary_is_the_value(smollm2, smol_states):
    model, _, _ = smollm2
    states, _, targets, _, _ = smol_states
    full = fv.top_k_value(model, states.head_input[:2], targets[:2], output_embedding(model).shape[0])
    assert torch.allclose(full, fv.memory_value(model, states.head_input[:2], targets[:2]), atol=1e-4)


def test_target_rank_counts_strictly_larger_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
    assert fv.target_rank(scores, torch.tensor([2, 0])).tolist() == [1, 0]


@pytest.mark.parametrize("bad", ["abc", ["1", 2], [], [float("nan")], True])
def test_non_numeric_alpha_is_refused(bad):
    with pytest.raises(ParameterError, match="alpha"):
        fv.check_alphas(bad)


def test_unknown_site_is_refused(smollm2, smol_states):
    model, _, _ = smollm2
    states, _, targets, _, _ = smol_states
    with pytest.raises(ParameterError, match="site"):
        fv.sweep_head(model, states, states.head_input, targets, [1.0], "middle")
    with pytest.raises(ParameterError, match="site"):
        with fv.injected(model, "middle", states.head_input):
            pass


def test_smallest_alpha_reaching():
    assert fv.smallest_alpha_reaching([1, 2, 4], [0.1, 0.5, 0.9]) == 2
    assert fv.smallest_alpha_reaching([1, 2], [0.1, 0.2]) is None


def test_forward_sweep_agrees_with_cached_sweep(smollm2, smol_states):
    model, tokenizer, _ = smollm2
    states, _, targets, writes, _ = smol_states
    values = fv.memory_value(model, states.head_input, targets)
    cached = fv.sweep_head(model, states, values, targets, [2.0, 8.0], "post_norm")
    forward = fv.sweep_forward(model, tokenizer, writes, values, targets, [2.0, 8.0], "post_norm", batch_size=3)
    assert torch.allclose(cached["log_p_target"], forward["log_p_target"], atol=2e-3)
    assert torch.equal(cached["argmax"], forward["argmax"])
