"""Chapter 3: the attractor layer and the inference-time memory benchmark."""

import math

import numpy as np
import pytest
import torch

from fastmem import benchmark as bm
from fastmem import evaluation, stats, verdicts
from fastmem.attractors import (ATTRACTOR_SITES, OPERATING_RULES, AttractorConfig, AttractorLayer, operating_point,
                                qualifying)
from fastmem.book import glued_values
from fastmem.data import load_recall_probes
from fastmem.errors import ParameterError
from fastmem.models import transformer_blocks

from conftest import executed_ci_notebook

GLUED = ("attractor_ppl_delta_pct", "attractor_overhead_pct", "attractor_long_recall_change_pct",
         "attractor_repetition_change", "attractor_gated_comprehension_change_pct", "attractor_churn_ratio",
         "attractor_stateless_share")


def _inputs(n_passes=4, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (1, length), generator=generator) for _ in range(n_passes)]


def _run(model, layer, inputs):
    outputs = []
    with torch.no_grad(), layer:
        for x in inputs:
            outputs.append(model(x).logits)
    return outputs


@pytest.mark.parametrize("site", ATTRACTOR_SITES)
def test_zero_feedback_is_bit_identical_and_weights_frozen(tiny_neox, site):
    model, _, _ = tiny_neox
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _inputs()
    with torch.no_grad():
        plain = [model(x).logits for x in inputs]
    layer = AttractorLayer(model, AttractorConfig(layer=1, site=site, feedback_strength=0.0, n_attractors=4))
    for a, b in zip(plain, _run(model, layer, inputs)):
        assert torch.equal(a, b)
    assert layer.passes == len(inputs) and layer.strengths.sum() > 0, "state must still be updated"
    strong = AttractorLayer(model, AttractorConfig(layer=1, site=site, feedback_strength=0.5, n_attractors=4))
    changed = _run(model, strong, inputs)
    assert torch.equal(changed[0], plain[0]), "no feedback on the first pass"
    assert not torch.equal(changed[1], plain[1]), "feedback enters at the next pass"
    with torch.no_grad():
        assert torch.equal(model(inputs[1]).logits, plain[1]), "hook left behind"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_feedback_prepared_at_one_pass_is_added_at_the_next(tiny_neox):
    model, _, _ = tiny_neox
    inputs = _inputs(3)
    layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=4, feedback_strength=0.3))
    seen = []
    with torch.no_grad():
        plain_handle = layer.module.register_forward_hook(lambda m, a, o: seen.append(o[0].clone()))
        for x in inputs:
            model(x)
        plain_handle.remove()
        plain = list(seen)
        seen.clear()
        layer.attach()  # the layer's hook runs first, so the capture sees its modified output
        capture = layer.module.register_forward_hook(lambda m, a, o: seen.append(o[0].clone()))
        pending = []
        for x in inputs:
            pending.append(None if layer.feedback is None else layer.feedback.clone())
            model(x)
        capture.remove()
        layer.detach()
    assert torch.equal(seen[0], plain[0]) and pending[0] is None
    for t in (1, 2):
        assert torch.allclose(seen[t], plain[t] + pending[t][:, None, :], atol=1e-6), t
        assert pending[t].norm() > 0


def test_decay_drives_strengths_to_zero(tiny_neox):
    model, _, _ = tiny_neox
    layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=4, decay=0.5, feedback_strength=0.1))
    _run(model, layer, _inputs(3))
    assert layer.strengths.max() > 0
    # nothing is activated any more: the winner rule off and an unreachable threshold
    layer.config = layer.config.with_(winner_always_activates=False, activation_threshold=2.0)
    _run(model, layer, _inputs(40, seed=1))
    assert layer.strengths.max() < 1e-10
    assert layer.feedback.abs().max() < 1e-9


@pytest.mark.parametrize("site", ATTRACTOR_SITES)
def test_state_round_trips_exactly(tiny_neox, tmp_path, site):
    model, _, _ = tiny_neox
    config = AttractorConfig(layer=0, site=site, n_attractors=5, feedback_strength=0.2, gate_threshold=0.1, init="random")
    layer = AttractorLayer(model, config)
    _run(model, layer, _inputs(3))
    path = layer.save(tmp_path / "state.safetensors")
    copy = AttractorLayer.load(path, model)
    assert copy.config == layer.config and copy.block_index == layer.block_index
    assert copy.state_dict().keys() == layer.state_dict().keys()
    for key, value in layer.state_dict().items():
        assert value.dtype == copy.state_dict()[key].dtype and torch.equal(value, copy.state_dict()[key]), key
    nxt = _inputs(2, seed=3)
    for a, b in zip(_run(model, layer, nxt), _run(model, copy, nxt)):
        assert torch.equal(a, b)
    layer.reset()
    assert layer.attractors is None and layer.passes == 0 and layer.strengths.abs().sum() == 0
    with pytest.raises(ParameterError):
        AttractorLayer(model, config.with_(n_attractors=3)).load_state_dict(copy.state_dict())


def test_reloaded_layer_generates_what_the_original_did(tiny_neox, tmp_path):
    model, _, _ = tiny_neox
    prompt = _inputs(1, length=16, seed=5)[0]
    layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=4, feedback_strength=0.5))
    _run(model, layer, _inputs(4, seed=6))
    copy = AttractorLayer.load(layer.save(tmp_path / "layer.safetensors"), model)
    outputs = []
    for memory in (layer, copy):
        with torch.no_grad(), memory:
            outputs.append(model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False))
    assert torch.equal(outputs[0], outputs[1])
    assert copy.passes == layer.passes and torch.equal(copy.strengths, layer.strengths)


def test_gating_and_burn_in_suppress_feedback(tiny_neox):
    model, _, _ = tiny_neox
    inputs = _inputs(5)
    with torch.no_grad():
        plain = [model(x).logits for x in inputs]
    base = AttractorConfig(layer=1, n_attractors=4, feedback_strength=0.5)
    gated = AttractorLayer(model, base.with_(gate_threshold=1.0))  # no similarity reaches 1
    for a, b in zip(plain, _run(model, gated, inputs)):
        assert torch.equal(a, b)
    burn = AttractorLayer(model, base.with_(burn_in_passes=3))
    out = _run(model, burn, inputs)
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], out[:3]))
    assert not torch.equal(plain[3], out[3])
    by_strength = AttractorLayer(model, base.with_(burn_in_strength=0.999))
    assert all(torch.equal(a, b) for a, b in zip(plain, _run(model, by_strength, inputs)))


def test_streams_are_independent(tiny_neox):
    model, _, _ = tiny_neox
    x = torch.cat(_inputs(2, seed=5))
    layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=3, feedback_strength=0.3))
    layer.reset(n_streams=2)
    _run(model, layer, [x, x])
    single = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=3, feedback_strength=0.3))
    _run(model, single, [x[:1], x[:1]])
    assert torch.allclose(layer.strengths[0], single.strengths[0])


def test_bad_parameters_raise_one_line_errors(tiny_neox):
    model, _, _ = tiny_neox
    for bad in ({"n_attractors": 0}, {"decay": 1.5}, {"site": "mlp"}, {"gate_threshold": 2.0}):
        with pytest.raises(ParameterError):
            AttractorConfig(**bad)
    with pytest.raises(ParameterError):
        AttractorLayer(model, AttractorConfig(layer=7))
    with pytest.raises(ParameterError):
        bm.sliding_windows(100, 8, 16)


class _UniformModel(torch.nn.Module):
    """Logits all equal: the perplexity is exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})()


def test_perplexity_on_known_cases(tiny_neox):
    assert math.isclose(bm.perplexity(_UniformModel(50), torch.arange(40) % 50, 8, 4, progress=False)["ppl"], 50, rel_tol=1e-6)
    spans = bm.sliding_windows(10, 4, 2)
    assert sum(s[2] for s in spans) == 9  # every token after the first is scored once
    model, tokenizer, _ = tiny_neox
    ids = torch.randint(5, 1000, (70,), generator=torch.Generator().manual_seed(0))
    one = bm.perplexity(model, ids, 16, 8, batch_size=1, progress=False)
    batched = bm.perplexity(model, ids, 16, 8, batch_size=4, progress=False)
    assert math.isclose(one["ppl"], batched["ppl"], rel_tol=1e-5)
    with torch.no_grad():  # a single window equals the direct mean NLL
        logits = model(ids[None, :16]).logits
    direct = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:16]).exp().item()
    assert math.isclose(bm.perplexity(model, ids[:16], 16, 16, progress=False)["ppl"], direct, rel_tol=1e-5)


def test_overhead_reports_median_ratio_with_interval(tiny_neox):
    model, _, _ = tiny_neox
    layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=4))
    result = bm.overhead(model, torch.arange(5, 21), layer, repeats=3, decode_steps=2, progress=False)
    for kind in ("forward", "decode"):
        o = result[kind]
        assert len(o["plain_times"]) == len(o["memory_times"]) == 3
        ratios = np.array(o["memory_times"]) / np.array(o["plain_times"])
        assert math.isclose(o["overhead_pct"], 100 * (np.median(ratios) - 1))
        assert o["low"] <= o["high"]
    assert not layer._handles, "overhead must leave the model plain"


def test_overhead_verdict_on_synthetic_timings():
    """The ratio is paired: a machine-load drift shared by both members of a pair cancels."""
    rng = np.random.default_rng(0)
    load = np.exp(rng.normal(0, 0.5, 40))  # the machine gets much faster and slower between repetitions
    plain = 0.1 * load * np.exp(rng.normal(0, 0.005, 40))
    for true_pct, verdict in ((5, "holds"), (13, "inconclusive"), (25, "does not hold")):
        memory = plain * (1 + true_pct / 100) * np.exp(rng.normal(0, 0.005, 40))
        o = bm.timing_ratio(plain, memory)
        assert o["low"] <= true_pct + 0.5 and o["high"] >= true_pct - 0.5, (true_pct, o)
        assert o["high"] - o["low"] < 2, "a shared load drift must not widen a paired interval"
        assert stats.verdict_at_most(o["low"], o["high"], 13) == verdict, true_pct
    with pytest.raises(ParameterError):
        bm.timing_ratio([1.0, 2.0], [1.0])


def test_repetition_metrics():
    assert evaluation.repeated_ngram_rate([1, 2, 3, 4, 5], 2) == 0
    assert evaluation.repeated_ngram_rate([1, 2, 1, 2, 1, 2], 2) == 3 / 5
    assert evaluation.distinct_n([1, 1, 1, 1], 2) == 1 / 3
    change = stats.paired_change([1, 1, 0, 0], [1, 1, 1, 0], relative=True)
    assert math.isclose(change["change"], 50.0)
    assert change["low"] <= 50.0 <= change["high"]
    assert bm._contains("Her bike is red.", "red") == 1 and bm._contains("She considered it", "red") == 0


def test_hook_never_synchronises_with_the_host(tiny_neox, monkeypatch):
    """Every pass, the first one (initialisation) included, runs without reading a tensor's value on the host."""
    model, _, _ = tiny_neox
    layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=4, feedback_strength=0.5, gate_threshold=0.1,
                                                  burn_in_passes=1, burn_in_strength=0.05))
    layer.record = []
    hidden = [torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def host_read(*args, **kwargs):
        raise AssertionError("the hook read a tensor's value on the host")

    with monkeypatch.context() as patched:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patched.setattr(torch.Tensor, name, host_read)
        changed = [layer._hook(layer.module, (), (h,)) for h in hidden]
    assert changed[0] is None and all(isinstance(c, tuple) for c in changed[1:])
    assert len(layer.diagnostics()) == 4 and int(layer.feedback_passes) >= 1


def test_diagnostics_count_passes_with_several_active_attractors(tiny_neox):
    model, _, _ = tiny_neox
    for threshold, several in ((-1.0, 1.0), (2.0, 0.0)):  # every attractor fires / only the winner does
        layer = AttractorLayer(model, AttractorConfig(layer=1, n_attractors=4, activation_threshold=threshold))
        layer.record = []
        _run(model, layer, _inputs(3))
        rows = layer.diagnostics()
        assert [r["pass"] for r in rows] == [1, 2, 3]
        assert all(r["several_activated"] == several for r in rows), threshold


def test_teacher_forced_recall_is_paired_in_one_text(smollm2):
    model, tokenizer, _ = smollm2
    probes = load_recall_probes()[:2]
    essays = [tokenizer("The sea was calm and the lamp burned all night.", add_special_tokens=False).input_ids,
              tokenizer("Lava rises.", add_special_tokens=False).input_ids]
    ids, spans = bm.recall_sequence(tokenizer, probes[0], essays[0])
    assert [tokenizer.decode(ids[a:b]).strip() for a, b in spans] == [answer for _, answer in probes[0].questions]
    plain = bm.teacher_forced_recall(model, tokenizer, probes, essays, None, chunk=8, batch_size=2, progress=False)
    one_pass = bm.teacher_forced_recall(model, tokenizer, probes, essays, None, chunk=4096, batch_size=1, progress=False)
    np.testing.assert_allclose(plain["log_prob"], one_pass["log_prob"], atol=1e-3)  # chunks and padding change nothing
    noop = AttractorLayer(model, AttractorConfig(feedback_strength=0.0))
    same = bm.teacher_forced_recall(model, tokenizer, probes, essays, noop, chunk=8, batch_size=2, progress=False)
    assert np.array_equal(plain["log_prob"], same["log_prob"]) and np.array_equal(plain["recalled"], same["recalled"])
    strong = AttractorLayer(model, AttractorConfig(feedback_strength=8.0))
    broken = bm.teacher_forced_recall(model, tokenizer, probes, essays, strong, chunk=8, batch_size=2, progress=False)
    assert broken["log_prob"].mean() < plain["log_prob"].mean() - 1, "a strong feedback must hurt recall"


def test_ci_run_glues_sane_values():
    values = glued_values(executed_ci_notebook("03_attractors.ipynb"))
    for name in GLUED:
        assert isinstance(values.get(name), float) and math.isfinite(values[name]), (name, values.get(name))
    assert isinstance(values["attractor_operating_point"], str) and "feedback strength" in values["attractor_operating_point"]
    # a layer with a small feedback must not wreck perplexity; the interval must bracket its estimate
    assert -5 < values["attractor_ppl_delta_pct"] < 5
    # (the block interval weighs windows equally, the estimate tokens: equal up to rounding here)
    low, high = values["attractor_ppl_delta_low"] - 1e-9, values["attractor_ppl_delta_high"] + 1e-9
    assert low <= values["attractor_ppl_delta_pct"] <= high
    assert 1 < values["attractor_ppl_plain"] < 200
    assert values["attractor_ppl_tokens"] == 508  # params/ci/03.yaml: 512 tokens, 4 windows of 128 scoring 127
    # a few cosines per pass cannot double the cost of a forward pass
    assert -50 < values["attractor_overhead_pct"] < 100
    assert values["attractor_overhead_low"] <= values["attractor_overhead_high"]
    # teacher-forced recall: 2 distinct probes, one under each of 2 seeds, x 3 facts; shares and p-values in range
    assert values["attractor_long_recall_probes"] == 2 and values["attractor_n_facts"] == 6
    assert values["attractor_positive_control_probes"] == 2  # the grid's strongest point, on every probe
    assert values["attractor_dev_windows"] == 2  # params/ci/03.yaml: 256 tokens in windows of 128
    plain, layer = values["attractor_long_recall_plain"], values["attractor_long_recall_layer"]
    assert 0 <= plain <= 1 and 0 <= layer <= 1
    if plain > 0:
        assert math.isclose(values["attractor_long_recall_change_pct"], 100 * (layer / plain - 1), abs_tol=1e-9)
    for name in ("attractor_long_recall_p_value", "attractor_long_recall_noise_floor", "attractor_comprehension_sign_p"):
        assert 0 <= values[name] <= 1, name
    assert math.isclose(values["attractor_repetition_change"],
                        values["attractor_repetition_layer"] - values["attractor_repetition_plain"], abs_tol=1e-9)
    assert -1 <= values["attractor_repetition_change"] <= 1
    # comprehension: F1 in [0, 1], the evidence in the prompt must help, changed answers counted out of 3
    assert 0 <= values["attractor_no_context_f1"] <= values["attractor_context_f1"] <= 1
    assert values["attractor_context_f1"] > 0
    assert 0 <= values["attractor_comprehension_changed_answers"] <= 3
    assert -100 <= values["attractor_gated_comprehension_change_pct"] <= 1000
    assert values["attractor_kl_smallest_k"] >= 0 and values["attractor_kl_largest_k"] >= 0
    assert 0 <= values["attractor_several_active_largest_k"] <= 1
    # failure modes: intervals ordered, shares and cosines in range (params/ci/03.yaml: 2 article pairs
    # of 2 + 2 passes, so a lag is 1..3, 3 meaning "never crossed")
    assert values["attractor_kl_ratio_low"] <= values["attractor_kl_ratio_high"]
    assert 0 <= values["attractor_answer_changes_largest_k"] <= 1
    assert -1 <= values["attractor_cos_heaviest_decay_low"] <= values["attractor_cos_heaviest_decay_high"] <= 1
    assert values["attractor_switch_pairs"] == 2 and 1 <= values["attractor_switch_lag"] <= 3
    assert 0 <= values["attractor_snap_back_share"] <= 1
    assert 0 <= values["attractor_snapped_share_low"] <= values["attractor_snapped_share_high"] <= 1
    for key in ("ppl", "overhead", "long", "gated", "k", "decay", "snap", "long_free"):
        assert values[f"attractor_verdict_{key}"] in verdicts.VERDICTS, key
    assert values["attractor_joint_verdict"] in verdicts.VERDICTS
    # the grid (params/ci/03.yaml: strengths 1 and 4): an interval per point and endpoint, in words by strength
    assert values["attractor_ungated_points"] == "ungated_1 ungated_4"
    assert values["attractor_gated_points"] == "gated_1 gated_4"
    for point in ("ungated_1", "ungated_4", "gated_1", "gated_4"):
        assert values[f"attractor_ppl_low_{point}"] <= values[f"attractor_ppl_high_{point}"], point
    for point in ("ungated_1", "ungated_4"):
        assert 0 <= values[f"attractor_recall_p_{point}"] <= 1
    for point in ("gated_1", "gated_4"):
        assert 0 <= values[f"attractor_comp_changed_{point}"] <= 4
    for key in ("ppl", "recall", "comp", "joint"):
        assert values[f"attractor_{key}_by_strength"].endswith("at 1, 4"), key
    # the failure modes' references and controls
    assert math.isclose(values["attractor_decay_stateless_reference"], 1.0, abs_tol=1e-5)
    assert values["attractor_decay_no_decay_reference"] < 0.999
    for name in ("instability", "snap", "decay", "free", "positive"):
        assert values[f"attractor_{name}_control_detected"] in ("yes", "no"), name
    assert values["attractor_instability_control_detected"] == "yes"
    assert 0 <= values["attractor_snap_crossed_pairs"] <= values["attractor_switch_pairs"]
    # params/ci/03.yaml: 4 perplexity windows, too few for Politis and White's rule: one block, one point
    assert values["attractor_ppl_block_length"] == 4
    assert values["attractor_ppl_delta_low"] == values["attractor_ppl_delta_high"]
    assert values["attractor_verdict_ppl"] == "inconclusive"
    # every verdict is the plan's, under every rule of its history
    for decided in verdicts.decide_plan(verdicts.load_plan("03"), values):
        assert values[decided.claim.glue] == decided.verdict, decided.claim.id


@pytest.mark.parametrize("fixture", ["tiny_neox", "smollm2"])
def test_shared_perplexity_equals_the_full_model(fixture, request):
    model, _, _ = request.getfixturevalue(fixture)
    ids = torch.randint(5, 1000, (70,), generator=torch.Generator().manual_seed(1))
    block = len(transformer_blocks(model)) // 2
    shared = bm.SharedPerplexity(model, ids, 16, 16, block)
    plain = bm.perplexity(model, ids, 16, 16, progress=False)
    assert np.allclose(shared.plain["nll"], plain["nll"], rtol=1e-5)
    config = AttractorConfig(layer=block, n_attractors=4, feedback_strength=2.0)
    full = bm.perplexity(model, ids, 16, 16, memory=AttractorLayer(model, config), progress=False)
    cached = shared.score(AttractorLayer(model, config))
    assert np.allclose(cached["nll"], full["nll"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(full["nll"][1:], plain["nll"][1:], rtol=1e-4), "the layer must act (control)"
    early = bm.perplexity_windows(full, [0, 1])
    assert early["tokens"].sum() == full["tokens"][:2].sum()


def test_suite_cell_writes_value_change_and_interval():
    row = {"memory": 0.5123, "change": 1.2, "low": 0.4, "high": 2.0, "unit": "% change"}
    assert bm.suite_cell(row) == "0.512 (+1.200% [+0.400, +2.000])"
    assert bm.suite_cell({**row, "unit": "absolute change"}) == "0.512 (+1.200 [+0.400, +2.000])"


# the development table of the default run (section 3.2), as the chapter printed it
DEV_TABLE = {"feedback": [0.5, 0.5, 1.0, 1.0, 2.0, 2.0],
             "configuration": ["ungated", "gating + burn-in"] * 3,
             "acts": [True, False] * 3,
             "dev change %": [0.085, 0.0, 0.802, 0.0, 3.956, 0.0],
             "2nd half %": [0.183, 0.0, 1.361, 0.0, 6.456, 0.0]}


def test_operating_point_rules_on_the_default_development_table():
    import pandas as pd

    table = pd.DataFrame(DEV_TABLE)
    first, current = (operating_point(table, 1.0, rule) for rule in OPERATING_RULES)
    # the rule as first registered takes the strongest feedback within the band: a gate that never opens
    assert (first["feedback"], first["configuration"]) == (2.0, "gating + burn-in")
    # the rule used now asks that the layer act and that the second half stay within the band
    assert (current["feedback"], current["configuration"]) == (0.5, "ungated")
    assert [int(qualifying(table, 1.0, rule).sum()) for rule in OPERATING_RULES] == [5, 1]
    # with nothing qualifying: the weakest candidate (first rule) or the weakest ungated one (rule used now)
    worse = table.assign(**{"dev change %": 5.0})
    assert (operating_point(worse, 1.0, OPERATING_RULES[1])["configuration"]) == "ungated"
    assert operating_point(worse, 1.0, OPERATING_RULES[0])["feedback"] == 0.5
    with pytest.raises(ParameterError):
        qualifying(table, 1.0, "loosest")


def test_block_bootstrap_perplexity_change():
    rng = np.random.default_rng(0)
    tokens = np.full(40, 100)
    loss = np.cumsum(rng.normal(0, 0.05, 40)) + 3.0  # a slowly wandering per-token loss: dependent windows
    plain = {"nll": loss * tokens, "tokens": tokens, "ppl": float(np.exp(loss.mean()))}
    layered_loss = loss + 0.01 + np.cumsum(rng.normal(0, 0.01, 40))
    other = {"nll": layered_loss * tokens, "tokens": tokens, "ppl": float(np.exp(layered_loss.mean()))}
    iid = bm.perplexity_change(plain, other, n_boot=500, seed=0)
    block = bm.perplexity_change(plain, other, n_boot=500, seed=0, block_bootstrap=True)
    assert block["change_pct"] == iid["change_pct"] and block["block_length"] > 1
    assert block["low"] <= block["change_pct"] <= block["high"]
    assert block["high"] - block["low"] > iid["high"] - iid["low"], "dependent windows widen the interval"
    # too few windows for Politis and White's rule: the stream is one block and the interval one point
    few = {key: (value[:4] if key != "ppl" else value) for key, value in plain.items()}
    few_other = {key: (value[:4] if key != "ppl" else value) for key, value in other.items()}
    short = bm.perplexity_change(few, few_other, n_boot=100, seed=0, block_bootstrap=True)
    assert short["block_length"] == 4 and short["low"] == short["high"]


def test_instability_rule_reads_the_state_and_needs_its_control():
    rule = verdicts.load_plan("03").claim("many_attractors_unstable").rule.spec
    flat = {"attractor_churn_ratio_low": 0.8, "attractor_churn_ratio_high": 1.3}
    assert verdicts.decide_rule(rule, {**flat, "attractor_instability_control_detected": "yes"}) == "does not hold"
    # a null is only a finding where the layer unstable by construction was seen to be unstable
    assert verdicts.decide_rule(rule, {**flat, "attractor_instability_control_detected": "no"}) == "inconclusive"
    steep = {"attractor_churn_ratio_low": 3.0, "attractor_churn_ratio_high": 5.0}
    assert verdicts.decide_rule(rule, {**steep, "attractor_instability_control_detected": "yes"}) == "holds"


def test_snap_back_rule_counts_crossing_pairs_only():
    rule = verdicts.load_plan("03").claim("snap_back").rule.spec
    values = {"attractor_snap_crossed_low": 0.6, "attractor_snap_crossed_high": 0.9,
              "attractor_snap_control_detected": "yes"}
    assert verdicts.decide_rule(rule, {**values, "attractor_snap_crossed_pairs": 25}) == "holds"
    assert verdicts.decide_rule(rule, {**values, "attractor_snap_crossed_pairs": 5}) == verdicts.UNDERPOWERED
