"""Chapter 4: latent memory adapters around a frozen backbone (fastmem.latent)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmem import data, evaluation, stats, verdicts
from fastmem.book import glued_values
from fastmem.errors import ParameterError
from fastmem.latent import (ServedAdapter, adapters, backbones, curriculum, devices, experiment, forgetting,
                            instruments, training)
from fastmem.models import model_info

from conftest import executed_ci_notebook

TURNS = ["Ann: I moved to Lisbon in May.", "Bob: Nice, I adopted a dog called Rex.", "Ann: I paint on weekends.",
         "Bob: My sister lives in Oslo."]
QUESTIONS, ANSWERS = ["Where did Ann move?", "What is the dog called?"], ["Lisbon", "Rex"]


def _setup(model_tuple, rows=16):
    model, tokenizer, _ = model_tuple
    backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                       answer_tokens=4, turn_tokens=12)
    states = backbone.encode_turns(TURNS)
    train = backbone.prepare(QUESTIONS, ANSWERS)
    test = backbone.prepare(QUESTIONS)
    return backbone, states, train, test


@pytest.fixture(scope="module", params=["tiny_t5", "tiny_neox"])
def tiny(request):
    return _setup(request.getfixturevalue(request.param))


@pytest.mark.parametrize("method", adapters.METHODS)
def test_forward_backward_and_gradient_free_write(tiny, method):
    backbone, states, train, _ = tiny
    adapter = adapters.LatentAdapter(method, backbone.width, 16, top_k=4, hidden_rms=backbones.hidden_rms(train))
    bank = adapter.empty_bank().requires_grad_(True)  # even a bank and states that carry gradients
    traced = [z.clone().requires_grad_(True) for z in states]
    for z in traced:
        before = bank.detach().clone()
        bank = adapter.write(bank, z)
        assert bank.grad_fn is None and not bank.requires_grad
        assert not torch.equal(bank, before)  # the write changed the bank
    bulk, snaps = adapter.write_turns(adapter.empty_bank(), states, snapshots=[0, 2])
    assert bulk.grad_fn is None and all(s.grad_fn is None for s in snaps.values())
    assert torch.count_nonzero(snaps[0]) == 0
    torch.testing.assert_close(bulk, bank, rtol=1e-5, atol=1e-6)
    shared = adapters.shared_features(backbone.width, states, adapter.write_seed)
    fast, _ = adapter.write_turns(adapter.empty_bank(), features=shared)
    torch.testing.assert_close(fast, bank, rtol=1e-5, atol=1e-6)
    if method in ("m2", "m4", "m5", "m6"):  # start with the read gate closed; open it so every read parameter learns
        with torch.no_grad():
            adapter.gate.fill_(0.5)
    loss = backbone.loss(adapter, bank, train)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in adapter.read_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)  # every read parameter learns
    assert all(p.grad is None and not p.requires_grad for p in (adapter.w_q, adapter.w_k, adapter.w_v))
    assert all(p.grad is None for p in backbone.model.parameters())


@pytest.mark.parametrize("method", adapters.METHODS)
def test_empty_bank_is_adapter_only_and_closed_gate_is_backbone(tiny, method):
    backbone, states, train, test = tiny
    adapter = adapters.LatentAdapter(method, backbone.width, 16, top_k=4, seed=3)
    other_write = adapters.LatentAdapter(method, backbone.width, 16, top_k=4, seed=3, write_seed=99)
    if method in ("m2", "m4", "m5", "m6"):
        with torch.no_grad():
            adapter.gate.fill_(0.7)
            other_write.gate.fill_(0.7)
    full, _ = adapter.write_turns(adapter.empty_bank(), states)
    with torch.no_grad():
        loss_empty = backbone.loss(adapter, adapter.empty_bank(), train)
        loss_full = backbone.loss(adapter, full, train)
        loss_none = backbone.loss(None, None, train)
        # adapter-only: with the bank empty the write side (projections, row addresses) plays no part
        torch.testing.assert_close(backbone.loss(other_write, other_write.empty_bank(), train), loss_empty,
                                   rtol=0, atol=1e-6)
    assert not torch.equal(loss_empty, loss_full)  # the memory is read
    if adapter.injection == "residual":
        # bias-free reads: an empty bank adds nothing, so the adapter-only output is the frozen backbone's
        torch.testing.assert_close(loss_empty, loss_none, rtol=0, atol=1e-6)
        assert backbone.generate(adapter, adapter.empty_bank(), test, 2) == backbone.generate(None, None, test, 2)
        with torch.no_grad():
            adapter.gate.zero_()  # read gate closed: the backbone's output, whatever the bank holds
            torch.testing.assert_close(backbone.loss(adapter, full, train), loss_none, rtol=0, atol=1e-6)
    else:
        # prefix / KV tokens from an empty bank are the adapter's own constant tokens
        tokens = adapter.memory_tokens(adapter.empty_bank())
        assert torch.allclose(tokens, tokens[:1].expand_as(tokens))
        assert not torch.equal(loss_empty, loss_none)


def test_training_leaves_backbone_unchanged_and_save_load_round_trip(tiny_neox, tiny_t5, tmp_path):
    for model_tuple in (tiny_neox, tiny_t5):
        backbone, states, train, test = _setup(model_tuple)
        before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        for method in ("m1", "m3", "m5"):
            adapter = adapters.LatentAdapter(method, backbone.width, 16, seed=1)
            bank, _ = adapter.write_turns(adapter.empty_bank(), states)
            start = {k: v.clone() for k, v in adapter.state_dict().items()}
            losses = training.train_adapter(adapter, backbone, [{"batch": train, "bank": bank}], epochs=3, lr=1e-2,
                                            weight_decay=0.01, warmup_steps=1, batch_size=2, grad_accum=1,
                                            progress=False)
            assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
            assert any(not torch.equal(start[k], v) for k, v in adapter.state_dict().items())
            adapter.model = model_info(backbone.model)
            path = adapter.save(tmp_path / f"{method}.safetensors")
            loaded = adapters.LatentAdapter.load(path, backbone.model)
            assert (loaded.method, loaded.rows, loaded.gamma, loaded.seed) == (method, 16, adapter.gamma, 1)
            assert loaded.state_dict().keys() == adapter.state_dict().keys()
            for k, v in adapter.state_dict().items():
                assert torch.equal(v, loaded.state_dict()[k])
            with torch.no_grad():
                assert torch.equal(backbone.loss(adapter, bank, train), backbone.loss(loaded, bank, train))
        after = backbone.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(p.requires_grad for p in backbone.model.parameters())


def test_write_training_ablation_backpropagates_through_the_window(tiny_neox):
    backbone, states, train, _ = _setup(tiny_neox)
    adapter = adapters.LatentAdapter("m2", backbone.width, 16, train_write=True)
    with torch.no_grad():
        adapter.gate.fill_(0.5)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    start, _ = adapter.write_turns(adapter.empty_bank(), states[:2])
    assert start.grad_fn is None
    group = {"batch": train, "bank_before_window": start, "window_states": states[2:]}
    losses = training.train_adapter(adapter, backbone, [group], epochs=1, lr=1e-2, weight_decay=0.0, warmup_steps=1,
                                    batch_size=2, grad_accum=1, window=2, progress=False)
    assert math.isfinite(losses[0]) and adapter.w_q.grad is not None
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())


def test_isotonic_fit_and_forgetting_curve():
    y = np.array([0.2, 0.3, 0.1, 0.15, 0.0])
    fit = forgetting.isotonic_nonincreasing(y, [1, 1, 2, 1, 5])
    assert np.all(np.diff(fit) <= 1e-12)
    already = np.array([0.5, 0.4, 0.4, 0.1, 0.0])
    assert np.array_equal(forgetting.isotonic_nonincreasing(already, [3, 1, 2, 1, 1]), already)
    curve = forgetting.forgetting_curve([0.2, 0.4, 0.0, 0.1], [5, 40, 70, 300])
    assert curve["counts"].tolist() == [1, 1, 1, 0, 1]
    assert np.isnan(curve["fit"][3]) and np.all(np.diff(curve["fit"][[0, 1, 2, 4]]) <= 1e-12)
    assert [forgetting.lag_bucket(x) for x in (0, 31, 32, 255, 256, 900)] == [0, 0, 1, 3, 4, 4]


def test_bm25_locomo_and_parameter_errors():
    docs = ["Ann moved to Lisbon", "Bob has a dog", "The dog is called Rex", "weather talk"]
    assert evaluation.bm25_top_k("what is the dog called", docs, 1) == [2]
    convs = data.locomo_conversations(data.load_locomo())
    assert [c.sample_id for c in convs[7:]] == ["conv-48", "conv-49", "conv-50"]
    assert sum(len(c.questions) for c in convs[7:]) == 633  # the paper counts 639: six have no valid evidence
    assert all(q["lag"] >= 1 for c in convs for q in c.questions)
    with pytest.raises(ParameterError):
        adapters.LatentAdapter("m7", 8, 4)
    with pytest.raises(ParameterError):
        adapters.LatentAdapter("m6", 8, 4, top_k=8)


def test_ci_notebook_glued_values():
    values = glued_values(executed_ci_notebook("04_latent_memory.ipynb"))
    names = ["latent_f1_no_adapter", "latent_f1_rag", "latent_f1_rag_oracle", "latent_f1_long_context",
             "latent_f1_constant_answer", "latent_synthetic_recall_repaired", "latent_synthetic_recall_paper",
             "latent_oracle_bank_f1_m2", "latent_bank_probe_accuracy_repaired", "latent_bank_probe_accuracy_paper",
             "latent_read_grad_ratio_repaired", "latent_read_grad_ratio_paper", "latent_probe_chance"]
    for name in names:
        assert isinstance(values.get(name), float) and 0.0 <= values[name] <= 1.0, (name, values.get(name))
    gap = [values[f"latent_own_minus_wrong_m2{end}"] for end in ("_low", "", "_high")]
    assert -1.0 <= gap[0] <= gap[1] <= gap[2] <= 1.0
    # the CI set runs both capacities: every endpoint the plan reads for them is glued
    for cap in ("1x", "10x"):
        for end in ("", "_low", "_high", "_p", "_detectable", "_seeds_low", "_seeds_high"):
            assert isinstance(values[f"latent_own_minus_wrong_{cap}_m2{end}"], float), (cap, end)
    assert 0.0 <= values["latent_own_minus_wrong_10x_m2_p"] <= 1.0
    assert isinstance(values["latent_capacity_gain_m2_low"], float)
    assert values["latent_control_passed"] in ("yes", "no")
    # the paper design's closed gate lets no gradient reach the retrieval weights at the start
    assert values["latent_read_grad_ratio_start_paper"] == 0.0 < values["latent_read_grad_ratio_start_repaired"]
    assert values["latent_forced_generation_ok"] == "yes"
    for cap in ("1x", "10x"):
        assert values[f"latent_collapsed_{cap}_m2"] in ("yes", "no")
    # the constant answer is right only on adversarial questions, which the glued (non-adversarial) F1 leaves out
    assert values["latent_f1_constant_answer"] == 0.0
    assert isinstance(values["latent_train_steps"], int) and 1 <= values["latent_train_steps"] <= 2
    for key in "bcd":
        assert values[f"latent_verdict_{key}"] in verdicts.MEASURED, key
    assert values["latent_seed002_personalisation_verdict"] in verdicts.MEASURED
    assert values["latent_stateless_zero"] == "yes"
    assert values["latent_verdict_a"] == verdicts.TRUE_BY_CONSTRUCTION
    assert 0 < values["latent_minutes"] <= 3.0  # the CI budget of this chapter (it runs twice in CI)


def test_paired_endpoint_holds_the_seeds_fixed_and_tests_questions():
    """Two seeds, five questions, each better with the own bank under both seeds."""
    own = [np.array([0.5, 0.4, 0.6, 0.3, 0.9]), np.array([0.6, 0.5, 0.4, 0.5, 0.7])]
    wrong = [np.array([0.1, 0.0, 0.2, 0.1, 0.5]), np.array([0.2, 0.1, 0.0, 0.3, 0.1])]
    runs = [{"seed": seed, "f1": {"own": o, "wrong": w}} for seed, (o, w) in enumerate(zip(own, wrong))]
    gap = experiment.paired_endpoint(runs, "own", "wrong")
    per_question = stats.paired_difference(np.mean(wrong, axis=0), np.mean(own, axis=0))
    assert gap["change"] == pytest.approx(np.mean(own) - np.mean(wrong))
    assert (gap["low"], gap["high"], gap["detectable"]) == (per_question.low, per_question.high,
                                                          per_question.detectable)
    # the sign test counts questions, not (seed, question) rows: 5 of 5 better gives 2 / 2**5, not 2 / 2**10
    assert (gap["better"], gap["worse"]) == (5, 0)
    assert gap["p_value"] == pytest.approx(2 * 0.5 ** 5)
    # the first design's interval, which the registered rules read: seeds resampled, then questions
    rows = stats.paired_change(np.concatenate(wrong), np.concatenate(own), relative=False,
                               clusters=np.repeat([0, 1], 5), units=np.tile(np.arange(5), 2))
    assert (gap["low_seeds_resampled"], gap["high_seeds_resampled"]) == (rows["low"], rows["high"])
    # a mask keeps only some questions
    kept = experiment.paired_endpoint(runs, "own", "wrong", keep=np.array([True, True, False, False, True]))
    assert kept["change"] == pytest.approx(np.mean([o[[0, 1, 4]] for o in own]) - np.mean([w[[0, 1, 4]] for w in wrong]))


NAMES = ["Lisbon", "Oslo", "Paris", "Rome", "Tokyo", "Cairo"]


def _fact_setting():
    """Six one-fact conversations that differ only in the fact; the same question for all of them."""
    convs = {f"c{i}": data.Conversation(f"c{i}", ["Bob: hello there.", f"Ann: my pet is called {name}.", "Bob: nice."],
                                        [1, 1, 2]) for i, name in enumerate(NAMES)}
    questions = [{"question": "What is Ann's pet called?", "answer": name, "evidence": [1], "sample_id": f"c{i}",
                  "category": 4} for i, name in enumerate(NAMES)]
    partner = {f"c{i}": f"c{(i + 1) % len(NAMES)}" for i in range(len(NAMES))}
    return convs, experiment.asking_points(questions, convs, partner)


TRAIN = {"weight_decay": 0.0, "batch_size": 6, "max_steps": 150, "eval_every": 10, "patience": 5, "warmup_steps": 1}


def test_an_adapter_learns_to_recall_a_written_fact(tiny_neox):
    """Only the bank tells the conversations apart, so answering right means reading it: the control
    fails if the read path is cut (the wrong bank, or an empty one, gives other answers)."""
    model, tokenizer, _ = tiny_neox
    backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                       answer_tokens=4, turn_tokens=12)
    convs, questions = _fact_setting()
    run, = experiment.run_latent_experiment(backbone, convs, questions, questions, questions, methods=["m2"], rows=8,
                                            gammas=[1.0], seeds=[0], lr=3e-2, train=TRAIN, max_new_tokens=3,
                                            conditions=("own", "wrong", "zero"))
    assert run["f1"]["own"].mean() >= 5 / 6
    assert run["f1"]["wrong"].mean() <= 1 / 6 and run["f1"]["zero"].mean() <= 1 / 6
    curve = [loss for _, loss in run["training"]["valid_curve"]]
    assert run["training"]["best_valid_loss"] == min(curve) < curve[0]


def test_the_wrong_bank_control_changes_nothing_but_the_bank(tiny_neox, monkeypatch):
    """With every write zeroed, own and wrong banks are the same bank, so they give the same answers."""
    model, tokenizer, _ = tiny_neox
    backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                       answer_tokens=4, turn_tokens=12)
    convs, questions = _fact_setting()
    monkeypatch.setattr(adapters.LatentAdapter, "_update", lambda self, bank, feat, inplace=False: torch.zeros_like(bank))
    run, = experiment.run_latent_experiment(backbone, convs, questions, questions, questions, methods=["m1"], rows=8,
                                            gammas=[1.0], seeds=[0], lr=1e-2, train={**TRAIN, "max_steps": 4},
                                            max_new_tokens=3, conditions=("own", "wrong", "zero"))
    assert run["preds"]["own"] == run["preds"]["wrong"] == run["preds"]["zero"]


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_t5"])
@pytest.mark.parametrize("method", ["m1", "m2"])
def test_the_experiment_runs_on_both_families(fixture, method, request):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                       answer_tokens=4, turn_tokens=8)
    filler = [t for c in data.locomo_conversations(data.load_locomo(), max_turns=40)[:2] for t in c.turns]
    by_id, questions = curriculum.fact_curriculum(8, filler, filler_turns=3, seed=1)
    ids = list(by_id)
    partner = {sid: ids[(i + 1) % len(ids)] for i, sid in enumerate(ids)}
    qs = experiment.asking_points(questions, by_id, partner)
    train_q, valid_q, test_q = qs[:8], qs[8:12], qs[12:]
    states = experiment.encode_conversations(backbone, by_id.values())
    centre = adapters.write_centre([z for sid in ids for z in states[sid]])
    lesson = experiment.Curriculum(train_q, valid_q, states,
                                   experiment.prepare_questions(backbone, train_q, valid_q, test_q),
                                   steps=2, lr=1e-2, eval_every=1, patience=1)
    runs = experiment.run_latent_experiment(backbone, by_id, train_q, valid_q, test_q, methods=[method], rows=8,
                                            gammas=[0.95, 1.0], seeds=[0], lr=1e-2,
                                            train={**TRAIN, "max_steps": 2, "eval_every": 1}, max_new_tokens=2,
                                            prefix="question: a\nanswer: b\n", design="repaired", centre=centre,
                                            curriculum=lesson)
    assert [(r["gamma"], r["method"]) for r in runs] == [(0.95, method), (1.0, method)]
    for run in runs:
        assert set(run["f1"]) == set(experiment.CONDITIONS)
        assert all(len(f1) == len(test_q) and ((0 <= f1) & (f1 <= 1)).all() for f1 in run["f1"].values())
        assert run["training"]["steps"] == 2 and len(run["training"]["valid_curve"]) == 3
        assert run["curriculum"]["steps"] == 2 and run["adapter"].design.name == "repaired"
        assert all(len(v) == len(test_q) and np.isfinite(v).all() for v in run["nll"].values())


def test_asking_points():
    conv = data.Conversation("a", ["A: x", "B: y", "A: z", "B: w", "A: v"], [1, 1, 2, 2, 3])
    other = data.Conversation("b", ["A: p", "B: q"], [1, 2])
    convs = {"a": conv, "b": other}
    q, = experiment.asking_points([{"question": "?", "answer": "x", "evidence": [2, 0], "sample_id": "a"}], convs,
                                  {"a": "b", "b": "a"})
    assert (q["asked_at"], q["sessions"], q["lag"]) == (4, 2, 4)  # after session 2, which holds turn 2
    assert (q["wrong_id"], q["wrong_at"]) == ("b", 2)



@pytest.mark.parametrize("method", ["m1", "m2", "m3"])
def test_a_bank_per_question_matches_a_shared_bank(tiny, method):
    backbone, states, train, _ = tiny
    adapter = adapters.LatentAdapter(method, backbone.width, 16, hidden_rms=backbones.hidden_rms(train))
    if hasattr(adapter, "gate"):
        with torch.no_grad():
            adapter.gate.fill_(0.5)
    bank, _ = adapter.write_turns(adapter.empty_bank(), states)
    shared = backbone.loss(adapter, bank, train)
    stacked = backbone.loss(adapter, torch.stack([bank] * len(train)), train)
    torch.testing.assert_close(stacked, shared, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["m2", "m4"])
@pytest.mark.parametrize("gamma", [0.95, 0.5])
def test_write_decay_scales_the_bank_by_gamma_per_turn(tiny, method, gamma):
    """A turn whose states are zero adds nothing, so what is left of the bank is exactly gamma times it."""
    backbone, states, _, _ = tiny
    adapter = adapters.LatentAdapter(method, backbone.width, 16, gamma=gamma, seed=5)
    bank, _ = adapter.write_turns(adapter.empty_bank(), states)
    assert bank.abs().sum() > 0
    silent = [torch.zeros_like(states[0])] * 3
    decayed, _ = adapter.write_turns(bank, silent)
    torch.testing.assert_close(decayed, gamma ** 3 * bank, rtol=1e-5, atol=1e-7)


def test_an_adapter_file_of_another_kind_or_model_ends_with_one_line(tiny_neox, smollm2, tmp_path):
    from fastmem.attractors import AttractorLayer
    from fastmem.errors import MemoryFileError

    model = tiny_neox[0]
    adapter = adapters.LatentAdapter("m2", tiny_neox[2].width, 8, model=tiny_neox[2])
    path = adapter.save(tmp_path / "adapter.safetensors")
    with pytest.raises(MemoryFileError, match="kind 'latent_adapter', not 'attractor_layer'"):
        AttractorLayer.load(path, model)
    with pytest.raises(MemoryFileError, match="width 64"):
        adapters.LatentAdapter.load(path, smollm2[0])
    layer_path = AttractorLayer(model, layer=1).save(tmp_path / "layer.safetensors")
    with pytest.raises(MemoryFileError, match="kind 'attractor_layer', not 'latent_adapter'"):
        adapters.LatentAdapter.load(layer_path, model)


def test_an_adapter_whose_read_is_cut_does_not_recall(tiny_neox, monkeypatch):
    """The recall test above fails when the read path is cut: with the bank kept from the read (it
    sees an empty bank), the own bank answers exactly as the wrong one."""
    model, tokenizer, _ = tiny_neox
    backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                       answer_tokens=4, turn_tokens=12)
    convs, questions = _fact_setting()
    read = adapters.LatentAdapter.residual
    monkeypatch.setattr(adapters.LatentAdapter, "residual", lambda self, h, bank: read(self, h, torch.zeros_like(bank)))
    run, = experiment.run_latent_experiment(backbone, convs, questions, questions, questions, methods=["m2"], rows=8,
                                            gammas=[1.0], seeds=[0], lr=3e-2, train={**TRAIN, "max_steps": 20},
                                            max_new_tokens=3, conditions=("own", "wrong"))
    assert run["preds"]["own"] == run["preds"]["wrong"]
    assert run["f1"]["own"].mean() < 5 / 6


_FACTORIES = ("zeros", "ones", "full", "arange", "tensor", "as_tensor", "empty", "randn", "rand")


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_t5"])
def test_every_tensor_the_experiment_creates_follows_the_device(fixture, request):
    """No CPU-only code path: every tensor fastmem.latent creates names its device (checked on the CPU,
    the only device here; CUDA cannot be tested on this machine), and the run records its device."""
    from torch.overrides import TorchFunctionMode

    model, tokenizer, _ = request.getfixturevalue(fixture)
    latent_dir = str(Path(adapters.__file__).parent)
    unplaced = []

    class RecordUnplaced(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            caller = sys._getframe(1).f_code.co_filename
            if getattr(func, "__name__", "") in _FACTORIES and caller.startswith(latent_dir) \
                    and "device" not in (kwargs or {}):
                unplaced.append(f"{func.__name__} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return func(*args, **(kwargs or {}))

    convs, questions = _fact_setting()
    with RecordUnplaced():
        backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                           answer_tokens=4, turn_tokens=12, device="cpu")
        runs = experiment.run_latent_experiment(backbone, convs, questions[:4], questions[4:], questions[4:],
                                                methods=["m1", "m2"], rows=8, gammas=[1.0], seeds=[0], lr=1e-2,
                                                train={**TRAIN, "max_steps": 2, "eval_every": 1},
                                                max_new_tokens=2, device="cpu")
    assert unplaced == []
    assert backbone.device == torch.device("cpu")
    assert all(r["device"] == "cpu" and r["adapter"].device == torch.device("cpu") for r in runs)


def test_auto_device_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ParameterError, match="device must be"):
        devices.resolve_device("gpu please")


def test_an_adapter_from_the_experiment_saves_and_loads_to_identical_outputs(tiny_neox, tmp_path):
    model, tokenizer, _ = tiny_neox
    backbone = backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                       answer_tokens=4, turn_tokens=12)
    convs, questions = _fact_setting()
    run, = experiment.run_latent_experiment(backbone, convs, questions, questions, questions, methods=["m2"], rows=8,
                                            gammas=[0.95], seeds=[2], lr=3e-2,
                                            train={**TRAIN, "max_steps": 10, "eval_every": 5},
                                            max_new_tokens=3, conditions=("own",))
    trained = run["adapter"]
    loaded = adapters.LatentAdapter.load(trained.save(tmp_path / "m2.safetensors"), model)
    assert (loaded.method, loaded.rows, loaded.gamma, loaded.seed) == ("m2", 8, 0.95, 2)
    assert float(trained.gate.detach()) != 0.0  # trained: the saved read is not the initial closed gate
    states = experiment.encode_conversations(backbone, convs.values())
    batch = backbone.prepare([q["question"] for q in questions], [q["answer"] for q in questions])
    prompts = backbone.prepare([q["question"] for q in questions])
    banks = {}
    for name, adapter in (("trained", trained), ("loaded", loaded)):  # each question's own bank, where asked
        banks[name] = torch.stack([adapter.write_turns(adapter.empty_bank(), states[q["sample_id"]][: q["asked_at"]])[0]
                                   for q in questions])
    assert torch.equal(banks["loaded"], banks["trained"])
    with torch.no_grad():
        assert torch.equal(backbone.loss(trained, banks["trained"], batch), backbone.loss(loaded, banks["loaded"], batch))
    answers = backbone.generate(loaded, banks["loaded"], prompts, 3)
    assert answers == backbone.generate(trained, banks["trained"], prompts, 3) == run["preds"]["own"]


def _served(tiny_neox, method="m2"):
    backbone, states, train, _ = _setup(tiny_neox)
    adapter = adapters.LatentAdapter(method, backbone.width, 16, hidden_rms=backbones.hidden_rms(train), seed=3)
    with torch.no_grad():
        adapter.gate.fill_(0.5)
    served = ServedAdapter(backbone.model, adapter, write_block=backbone.write_block, inject_block=backbone.inject,
                           turn_tokens=backbone.turn_tokens)
    return backbone, states, adapter, served


@pytest.mark.parametrize("method", ["m2", "m4", "m5", "m6"])
def test_served_adapter_reads_as_the_backbone_does(tiny_neox, method):
    """The hook adds the same residual at the same block as chapter 4's backbone: the same answer loss."""
    backbone, states, adapter, served = _served(tiny_neox, method)
    bank, _ = adapter.write_turns(adapter.empty_bank(), states)
    one = backbone.prepare(QUESTIONS[:1], ANSWERS[:1])
    with torch.no_grad():
        expected = backbone.loss(adapter, bank, one)
        served.reset()
        served.banks = bank[None].clone()
        with served:
            logits = backbone.model(one.ids, position_ids=one.positions).logits
        plain = backbone.model(one.ids, position_ids=one.positions).logits
    chosen = one.labels != -100
    loss = torch.nn.functional.cross_entropy(logits[chosen].float(), one.labels[chosen])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, plain)  # the read is not a no-op: cutting it fails the identity


def test_served_adapter_writes_each_pass_after_it_ends_as_the_backbone_writes_a_turn(tiny_neox):
    backbone, _, adapter, served = _served(tiny_neox)
    model, tokenizer = backbone.model, backbone.tokenizer
    first = torch.tensor([tokenizer.encode(TURNS[1])[: backbone.turn_tokens]])
    second = torch.tensor([tokenizer.encode(TURNS[2])[: backbone.turn_tokens]])
    with torch.no_grad():
        plain = [model(ids).logits for ids in (first, second)]
        with served:
            after_empty = model(first).logits
            written = served.banks[0].clone()
            after_write = model(second).logits
        detached = model(second).logits
    assert torch.equal(after_empty, plain[0])  # an empty bank is the plain model, and a pass never reads itself
    expected = adapter.write(adapter.empty_bank(), backbone.encode_turns([TURNS[1]])[0])
    torch.testing.assert_close(written, expected, rtol=1e-4, atol=1e-5)
    assert served.turns_written == 2
    assert not torch.allclose(after_write, plain[1])  # the next pass reads what the first wrote
    assert torch.equal(detached, plain[1])
    served.reset(n_streams=2)
    assert served.banks.shape[0] == 2 and served.banks.abs().sum() == 0 and served.turns_written == 0
    with served, pytest.raises(ParameterError, match="banks"):
        model(torch.cat([first, first, first]))


def test_only_residual_reads_can_be_served(tiny_neox):
    backbone, _, _, _ = _served(tiny_neox)
    for method in ("m1", "m3"):
        adapter = adapters.LatentAdapter(method, backbone.width, 16)
        with pytest.raises(ParameterError, match="residual"):
            ServedAdapter(backbone.model, adapter, write_block=1, inject_block=1)


# ---------------------------------------------------------------------------- write and read designs
def _residual_read(method, width, design, centre=None, **kwargs):
    return adapters.LatentAdapter(method, width, 16, design=design, centre=centre, seed=4, **kwargs)


@pytest.mark.parametrize("method", ["m2", "m4", "m5", "m6"])
def test_the_paper_design_starts_closed_and_the_repaired_one_starts_at_a_zero_output(method):
    h, bank = torch.randn(3, 5, 16), torch.randn(16, 16)
    paper = _residual_read(method, 16, "paper")
    assert paper.design == adapters.DESIGNS["paper"] and float(paper.gate.detach()) == 0.0
    assert paper.o.weight.abs().sum() > 0
    assert torch.count_nonzero(paper.residual(h, bank)) == 0  # tanh(0) = 0 closes the read exactly
    repaired = _residual_read(method, 16, "repaired")
    assert float(torch.tanh(repaired.gate.detach())) != 0.0 and torch.count_nonzero(repaired.o.weight) == 0
    assert torch.count_nonzero(repaired.residual(h, bank)) == 0  # o = 0: still exactly nothing added
    with pytest.raises(ParameterError, match="design"):
        adapters.LatentAdapter(method, 16, 16, design="improved")


@pytest.mark.parametrize("method", ["m2", "m4", "m5", "m6"])
def test_gradient_reaches_what_the_read_retrieves_only_in_the_repaired_design(tiny, method):
    """The paper's closed gate multiplies the whole read, so nothing but the gate learns at first; with the
    output projection at zero instead, o learns at once and q, k, v (what is retrieved) after one step."""
    backbone, states, train, _ = tiny
    rms = backbones.hidden_rms(train)
    for design in ("paper", "repaired"):
        centre = adapters.write_centre(states) if design == "repaired" else None
        adapter = _residual_read(method, backbone.width, design, centre, hidden_rms=rms)
        bank, _ = adapter.write_turns(adapter.empty_bank(), states)
        assert bank.abs().sum() > 0
        backbone.loss(adapter, bank, train).backward()
        grads = {name: p.grad.abs().sum() for name, p in adapter.named_parameters() if p.requires_grad}
        retrieval = {name: g for name, g in grads.items() if name not in ("gate", "log_scale")}
        assert {"q.weight", "o.weight"} <= set(retrieval)
        if design == "paper":
            assert grads["gate"] > 0 and all(g == 0 for g in retrieval.values()), retrieval
            continue
        assert retrieval["o.weight"] > 0
        assert all(g == 0 for name, g in retrieval.items() if name != "o.weight"), retrieval  # o = 0 blocks them
        opt = torch.optim.Adam(adapter.read_parameters(), lr=1e-2)
        opt.step()
        opt.zero_grad()
        backbone.loss(adapter, bank, train).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for name, p in adapter.named_parameters() if name in retrieval), method


def test_content_states_drop_only_the_massive_sink():
    states = torch.randn(7, 16)
    states[0] *= 100  # an attention sink at the first position
    states[3] *= 5  # large, but within SINK_NORM_RATIO times the median
    kept = adapters.content_states(states)
    assert torch.equal(kept, states[1:])
    assert torch.equal(adapters.content_states(states[1:]), states[1:])  # nothing massive: all kept
    turns = [states, states[1:4] + 1.0]
    torch.testing.assert_close(adapters.write_centre(turns), torch.cat([states[1:], states[1:4] + 1.0]).mean(0))


def _shared_direction_turns(width=64, n_turns=16, seed=1):
    """Turns whose states share one huge common direction (norm 40) plus small parts of their own."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(width, generator=g)
    common = 40 * common / common.norm()
    return [common + 0.5 * torch.randn(12, width, generator=g) for _ in range(n_turns)]


def test_a_centred_write_spreads_a_turn_over_the_rows():
    """Without centring every token of a turn carries the shared direction, so they all land on one row;
    with the training turns' mean subtracted, a turn's tokens spread over many rows."""

    turns = _shared_direction_turns()
    centre = adapters.write_centre(turns)
    spread = {}
    for design in ("paper", "repaired"):
        adapter = adapters.LatentAdapter("m2", 64, 64, design=design, centre=centre if design == "repaired" else None)
        spread[design] = [instruments.effective_rows(adapter.write_turns(adapter.empty_bank(), [t])[0]) for t in turns]
    assert max(spread["paper"]) < 2.0  # one turn, one row
    assert min(spread["repaired"]) > 8.0
    # a state equal to the centre carries nothing of its own: it writes exactly nothing
    repaired = adapters.LatentAdapter("m2", 64, 64, design="repaired", centre=centre)
    _, _, values = repaired.turn_features([centre.repeat(3, 1)])[0]
    assert torch.count_nonzero(values) == 0


def test_save_load_keeps_the_design_and_the_centre(tiny_neox, tmp_path):
    width = tiny_neox[2].width
    centre = torch.randn(width)
    adapter = adapters.LatentAdapter("m2", width, 8, model=tiny_neox[2], design="repaired", centre=centre)
    loaded = adapters.LatentAdapter.load(adapter.save(tmp_path / "repaired.safetensors"), tiny_neox[0])
    assert loaded.design == adapters.DESIGNS["repaired"]
    assert torch.equal(loaded.centre, centre) and torch.count_nonzero(loaded.o.weight) == 0
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    turns = _shared_direction_turns(width, 2)
    written = [a.write_turns(a.empty_bank(), turns)[0] for a in (adapter, loaded)]
    assert torch.equal(*written)
    paper = adapters.LatentAdapter("m2", width, 8, model=tiny_neox[2])
    loaded = adapters.LatentAdapter.load(paper.save(tmp_path / "paper.safetensors"), tiny_neox[0])
    assert loaded.design == adapters.DESIGNS["paper"] and torch.count_nonzero(loaded.centre) == 0


# ---------------------------------------------------------------------------- generation and the endpoint
def _decoder(tiny_neox):
    model, tokenizer, _ = tiny_neox
    return backbones.make_backbone(model, tokenizer, inject_block=1, write_block=1, question_tokens=12,
                                   answer_tokens=6, turn_tokens=12)


def test_an_answer_may_open_with_a_bare_space_but_never_be_blank(tiny_neox):
    backbone = _decoder(tiny_neox)
    space = int(backbone.space_ids[0])
    assert backbone.tokenizer.convert_tokens_to_string(backbone.tokenizer.convert_ids_to_tokens([space])) == " "
    rows, first = backbone.barred(0, None)
    assert rows == slice(None) and backbone.stop_id in first.tolist() and space not in first.tolist()
    rows, after = backbone.barred(1, torch.tensor([5, space, 7, space], device=backbone.device))
    assert rows.flatten().tolist() == [1, 3]  # only the rows whose first token was a bare space
    assert {backbone.stop_id, space} <= set(after.flatten().tolist())
    assert backbone.barred(1, torch.tensor([5, 7], device=backbone.device)) is None
    assert backbone.barred(2, torch.tensor([space], device=backbone.device)) is None
    # "4817" and "7 May 2023" start with a bare space token; an answer of whitespace is never generated
    assert backbone._tok(" 4817")[0] == space
    assert backbone.can_generate(["Lisbon", "4817", "7 May 2023", "\n", " "]).tolist() == [True] * 3 + [False] * 2
    # a stray leading space or newline in the data (LoCoMo has " 23 July, 2023") is stripped, as training strips it
    assert backbone.can_generate([" 23 July, 2023", "  4817", "\nx"]).all()


def test_generation_never_returns_an_empty_answer(tiny_neox, monkeypatch):
    """Even a model that always prefers a newline, then a bare space, answers with text."""
    backbone = _decoder(tiny_neox)
    space, head = int(backbone.space_ids[0]), backbone.head

    def eager_to_stop(h):
        logits = head(h).clone()
        logits[..., backbone.stop_id] += 1e4
        logits[..., space] += 5e3
        return logits

    monkeypatch.setattr(backbone, "head", eager_to_stop)
    answers = backbone.generate(None, None, backbone.prepare(QUESTIONS + ["Who?"]), 4)
    assert len(answers) == 3 and all(a.strip() for a in answers), answers


def test_answer_nll_is_the_loss_per_question(tiny):
    backbone, states, train, _ = tiny
    adapter = adapters.LatentAdapter("m2", backbone.width, 16, design="repaired", centre=adapters.write_centre(states),
                                     hidden_rms=backbones.hidden_rms(train))
    with torch.no_grad():
        adapter.o.weight.normal_(0, 0.1)  # a read that changes the answers
    bank, _ = adapter.write_turns(adapter.empty_bank(), states)
    for read, memory in ((None, None), (adapter, bank)):
        nll = backbone.answer_nll(read, memory, train)
        with torch.no_grad():
            loss = backbone.loss(read, memory, train)
        tokens = (train.labels != -100).sum(1).float()
        assert nll.shape == (len(QUESTIONS),) and torch.isfinite(nll).all()
        torch.testing.assert_close((nll * tokens).sum() / tokens.sum(), loss, rtol=1e-5, atol=1e-6)
    same = backbone.prepare(["Where did Ann move?", "Where does Bob live?"], ["Lisbon", "Lisbon"])
    tokens = (same.labels != -100).sum(1)
    assert tokens[0] == tokens[1]  # the same answer length: the plain mean is the loss
    with torch.no_grad():
        torch.testing.assert_close(backbone.answer_nll(adapter, bank, same).mean(), backbone.loss(adapter, bank, same),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the fact curriculum
FILLER = [f"Speaker{i}: filler turn number {i} about the weather." for i in range(20)]


def test_fact_curriculum_states_each_fact_once_in_its_evidence_turn():
    convs, questions = curriculum.fact_curriculum(40, FILLER, facts_per_conversation=3, filler_turns=6, seed=0)
    assert len(convs) == 40 and len(questions) == 120
    for sid, conv in convs.items():
        asked = [q for q in questions if q["sample_id"] == sid]
        assert len(conv.turns) == 9 and len(asked) == 3
        assert len({q["question"] for q in asked}) == 3  # different things of one speaker
        assert len(set(conv.turns)) == 9 and sum(t in FILLER for t in conv.turns) == 6
        for q in asked:
            thing = next(t for t in curriculum.THINGS if f"'s {t} called?" in q["question"])
            fact = f"my {thing} is called {q['answer']}."
            assert [i for i, turn in enumerate(conv.turns) if fact in turn] == q["evidence"]
            assert [i for i, turn in enumerate(conv.turns) if f"my {thing} is" in turn] == q["evidence"]
            speaker = q["question"].split("'s ")[0].removeprefix("What is ")
            assert conv.turns[q["evidence"][0]].startswith(f"{speaker}: ")
            assert (q["asked_at"], q["category"], q["lag_kind"]) == (len(conv.turns), 0, "curriculum")
    again = curriculum.fact_curriculum(40, FILLER, facts_per_conversation=3, filler_turns=6, seed=0)
    assert again[1] == questions and {k: c.turns for k, c in again[0].items()} == {k: c.turns for k, c in convs.items()}
    other = curriculum.fact_curriculum(40, FILLER, facts_per_conversation=3, filler_turns=6, seed=1)
    assert other[1] != questions


# ---------------------------------------------------------------------------- instruments
def test_effective_rows_counts_the_rows_that_hold_content():
    bank = torch.zeros(16, 8)
    bank[3] = torch.randn(8)
    assert instruments.effective_rows(bank) == pytest.approx(1.0)
    for k in (2, 5, 16):
        equal = torch.zeros(16, 8)
        equal[:k] = torch.randn(8)
        assert instruments.effective_rows(equal) == pytest.approx(k, rel=1e-5)


def _labelled_banks(n, directions, signal, generator, rows=8):
    labels = torch.randint(0, len(directions), (n,), generator=generator)
    banks = torch.randn(n, rows, directions.shape[1], generator=generator)
    if signal:  # the answer written into one row, at a place that differs between banks
        where = torch.randint(0, rows, (n,), generator=generator)
        banks[torch.arange(n), where] += 3 * directions[labels]
    return banks, labels.numpy()


@pytest.mark.parametrize("signal", [True, False])
def test_the_bank_probe_finds_a_written_answer_and_nothing_in_noise(signal):
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 32, generator=g)
    train_banks, train_labels = _labelled_banks(200, directions, signal, g)
    test_banks, test_labels = _labelled_banks(200, directions, signal, g)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    result = instruments.probe_bank(train_banks, train_labels, test_banks, test_labels, n_classes=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left as found
    assert (result.n_train, result.n_test) == (200, 200) and 0.15 < result.chance < 0.35
    if signal:
        assert result.accuracy > 0.7 and result.accuracy > result.chance + 0.4
    else:
        assert result.accuracy < 0.4


def test_read_gradient_reaches_retrieval_only_once_the_read_is_open(tiny_neox):
    backbone, states, train, _ = _setup(tiny_neox)
    rms = backbones.hidden_rms(train)
    found = {}
    for design in ("paper", "repaired"):
        adapter = adapters.LatentAdapter("m2", backbone.width, 16, design=design, hidden_rms=rms, seed=2,
                                         centre=adapters.write_centre(states) if design == "repaired" else None)
        bank, _ = adapter.write_turns(adapter.empty_bank(), states)
        found[design] = instruments.read_gradient(adapter, backbone, train, [bank] * len(train), steps=3, lr=1e-2,
                                      weight_decay=0.0, batch_size=2, warmup_steps=1)
    before, _ = found["paper"]
    assert before.step == 0 and before.retrieval_share == 0.0 and before.contribution == 0.0
    assert math.isfinite(before.loss)
    before, after = found["repaired"]
    assert before.contribution == 0.0 and before.retrieval_share > 0  # o learns at once
    assert after.step == 3 and after.retrieval_share > 0 and after.contribution > 0 and after.loss < before.loss


def test_constant_agreement_ignores_case_and_spacing():
    assert instruments.constant_agreement(["Lisbon", " lisbon ", "Oslo", "LISBON"], "Lisbon") == 0.75
    assert instruments.constant_agreement(["new  york", "New York"], "New York") == 1.0
    assert instruments.constant_agreement([], "Lisbon") == 0.0
