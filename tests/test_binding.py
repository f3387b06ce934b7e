import pytest
import torch

from fastmem import binding as fb
from fastmem import tasks
from fastmem import value as fv
from fastmem.book import glued_values
from fastmem.errors import ParameterError
from fastmem.evaluation import first_word

from conftest import executed_ci_notebook

LAYER = 20


@pytest.fixture(scope="module")
def written(smollm2):
    model, tokenizer, _ = smollm2
    labels = tasks.single_token_labels(tokenizer)
    bindings = tasks.make_bindings(tasks.nonce_words(3, 5), tasks.CONTEXTS["train"], labels, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = fb.encode_bindings(model, tokenizer, bindings, [LAYER])
    memory = fb.write_memory(model, tokenizer, states["write"], bindings, LAYER)
    return bindings, states, memory, before


def test_writes_and_reads_leave_the_frozen_weights_unchanged(smollm2, written):
    model, tokenizer, _ = smollm2
    bindings, states, memory, before = written
    values, _ = fb.select_values(memory, "raw_both_top1", states["read"], LAYER)
    fb.generate(model, tokenizer, states["read"], values)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())


def test_empty_memory_leaves_generation_bit_identical(smollm2, written):
    model, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    plain = fb.generate(model, tokenizer, states["read"], None, max_new_tokens=5)
    values, index = fb.select_values(fb.BindingMemory.empty(memory.values.shape[1]), "raw_both_top1", states["read"], LAYER)
    assert (index == -1).all() and torch.equal(values, torch.zeros_like(values))
    assert fb.generate(model, tokenizer, states["read"], values, max_new_tokens=5) == plain
    prompt = tasks.read_prompt(bindings[0])
    batch = {k: v for k, v in fv.encode_prompts(model, tokenizer, [prompt]).items() if k != "position_ids"}
    reference = model.generate(**batch, max_new_tokens=5, do_sample=False)
    with fb.attached(model, fb.BindingMemory.empty(memory.values.shape[1]), None, LAYER, 0):
        assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), reference)


def test_memory_served_in_the_forward_pass_matches_the_cached_path(smollm2, written):
    model, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    values, _ = fb.select_values(memory, "raw_both_top1", states["read"], LAYER)
    cached = fb.generate(model, tokenizer, states["read"], values, max_new_tokens=3)
    for row in (0, 3):
        prompt = tasks.read_prompt(bindings[row])
        batch = {k: v for k, v in fv.encode_prompts(model, tokenizer, [prompt]).items() if k != "position_ids"}
        key_position = len(tokenizer.encode(fb.key_prefix(prompt, bindings[row].word))) - 1
        with fb.attached(model, memory, None, LAYER, key_position):
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        served = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        # the cached path stops once the first word is whole: the same text, up to there
        assert served.startswith(cached[row]) and first_word(served) == first_word(cached[row])


def test_written_value_recalls_its_own_statement(smollm2, written):
    model, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    values, index = fb.select_values(memory, "raw_both_top1", states["write"], LAYER)
    assert torch.equal(index, torch.arange(len(bindings)))
    hits = fb.exact_match(fb.generate(model, tokenizer, states["write"], values), [b.label for b in bindings])
    assert hits.mean() >= 0.8
    assert fb.exact_match(fb.generate(model, tokenizer, states["write"], None), [b.label for b in bindings]).mean() <= 0.2


def test_retrieval_returns_the_exact_nearest_key():
    generator = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(500, 32, generator=generator), torch.randn(40, 32, generator=generator)
    index, best = fb.retrieve(queries, keys)
    cosine = torch.stack([torch.nn.functional.cosine_similarity(q[None], keys) for q in queries])
    assert torch.equal(index, cosine.argmax(dim=1))
    assert torch.allclose(best, cosine.max(dim=1).values, atol=1e-6)
    allowed = torch.zeros(40, 500, dtype=torch.bool)
    allowed[:, 250:] = True
    assert (fb.retrieve(queries, keys, allowed)[0] >= 250).all()


def test_threshold_injects_nothing_for_a_query_that_matches_nothing(written):
    _, states, memory, _ = written
    values, index = fb.select_values(memory, "raw_both_top1", states["read"], LAYER, threshold=1.01)
    assert (index == -1).all() and torch.equal(values, torch.zeros_like(values))
    values, index = fb.select_values(memory, "raw_both_top1", states["read"], LAYER, threshold=-1.0)
    assert (index >= 0).all()


def _last_token_presence(tokens, token_mask, context_states, centre):
    """The gate's presence score with one token against one state, each prompt's first token left out."""
    token_mask = fb.after_first_token(token_mask)
    tokens = torch.nn.functional.normalize(tokens - centre, dim=-1)
    stored = torch.nn.functional.normalize(context_states - centre, dim=-1)
    similarity = torch.einsum("ptd,ed->pte", tokens, stored)
    return similarity.masked_fill(~token_mask[:, :, None], -torch.inf).max(dim=1).values


def _padded_states(prompts=4, positions=9, width=16, seed=0):
    """Left-padded random token states with a non-finite padded position and one very large token state."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(prompts, positions, width, generator=generator)
    mask = torch.ones(prompts, positions, dtype=torch.bool)
    for row, pad in enumerate([0, 2, 5, positions - 1][:prompts]):
        mask[row, :pad] = False
    tokens[1, 0] = torch.nan  # a padded position's state need not be finite
    tokens[0, 0] *= 1e4  # a first token's state can dwarf the others (massive activations)
    return tokens, mask, torch.randn(width, generator=generator), generator


def test_presence_with_one_token_contexts_is_the_last_token_score_bit_for_bit():
    tokens, mask, centre, generator = _padded_states()
    stored = torch.randn(6, tokens.shape[2], generator=generator)
    expected = _last_token_presence(tokens, mask, stored, centre)
    assert torch.equal(fb.presence_scores(tokens, mask, stored, centre), expected)
    assert torch.equal(fb.presence_scores(tokens, mask, stored, centre, torch.ones(6, dtype=torch.long)), expected)


def test_presence_of_pooled_contexts_is_the_best_window_mean():
    tokens, mask, centre, generator = _padded_states()
    lengths = torch.tensor([1, 3, 2, 3, 5, 9, 10])
    stored = torch.randn(len(lengths), tokens.shape[2], generator=generator)
    scores = fb.presence_scores(tokens, mask, stored, centre, lengths)
    expected = torch.full_like(scores, -torch.inf)
    cosine = torch.nn.functional.cosine_similarity
    usable = fb.after_first_token(mask)
    for p in range(tokens.shape[0]):
        for e, length in enumerate(lengths.tolist()):
            for start in range(tokens.shape[1] - length + 1):
                if usable[p, start:start + length].all():
                    window = tokens[p, start:start + length].double().mean(dim=0)
                    score = cosine(window - centre.double(), stored[e].double() - centre.double(), dim=0)
                    expected[p, e] = max(expected[p, e], float(score))
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))  # -inf exactly where no window fits
    assert torch.isinf(scores[3]).all() and torch.isinf(scores[:, -2:]).all()  # one token only; longest windows
    assert torch.isfinite(scores[0, :-2]).all()
    finite = torch.isfinite(expected)
    assert torch.allclose(scores[finite], expected[finite], atol=1e-5)


def test_the_gate_leaves_each_prompts_first_token_out():
    """The first token's state can dwarf the rest: it must move neither the centre nor a presence score."""
    tokens, mask, centre, generator = _padded_states()
    kept = fb.after_first_token(mask)
    assert kept.sum(dim=1).tolist() == [n - 1 for n in mask.sum(dim=1).tolist()]
    assert not kept[0, 0] and not kept[2, 5] and kept[2, 6]
    stored = torch.randn(3, tokens.shape[2], generator=generator)
    changed = tokens.clone()
    changed[0, 0] = 1e6  # the first real token of prompt 0
    assert torch.equal(fb.presence_scores(changed, mask, stored, centre), fb.presence_scores(tokens, mask, stored, centre))
    states = fb.PromptStates({}, None, tokens={0: torch.nan_to_num(tokens)}, token_mask=mask)
    big = fb.PromptStates({}, None, tokens={0: torch.nan_to_num(changed)}, token_mask=mask)
    assert torch.equal(fb.token_centre([states], 0), fb.token_centre([big], 0))


@pytest.fixture(scope="module")
def gated(smollm2, written):
    """A projector, a memory with its keys projected once, and a gate fitted on the same bindings."""
    model, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    projector = fb.train_projector(states["read"].keys["symbol"][LAYER], states["write"].keys["symbol"][LAYER], 16, 50)
    projected = fb.BindingMemory(memory.symbol_states, memory.context_states, memory.values, memory.bindings,
                                 memory.layer, memory.value_kind, memory.model,
                                 context_lengths=memory.context_lengths).project(projector)
    unrelated = fb.encode_unrelated(model, tokenizer, list(tasks.Templates().unrelated[:12]), [LAYER])
    centre = fb.token_centre([states["write"], states["read"]], LAYER)
    gate = fb.fit_gate(projected, states["read"], states["plain"], unrelated, LAYER, projector, centre)
    return projector, projected, gate, unrelated


def test_whole_context_key_is_the_mean_over_the_context_phrase(smollm2, written):
    _, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    for kind, prompt_of in (("write", tasks.write_prompt), ("read", tasks.read_prompt)):
        encoded = states[kind]
        hidden, lengths = encoded.tokens[LAYER], encoded.lengths["context_whole"]
        for row, b in enumerate(bindings):
            prompt = prompt_of(b)
            full = tokenizer.encode(prompt)
            first = len(tokenizer.encode(prompt[:prompt.index(b.context)].rstrip()))
            end = len(tokenizer.encode(prompt[:prompt.index(b.context) + len(b.context)]))
            assert tokenizer.decode(full[first:end]).strip() == b.context  # the span is the phrase, no more
            offset = hidden.shape[1] - len(full)  # left padding
            explicit = hidden[row, offset + first:offset + end].mean(dim=0)
            assert lengths[row] == end - first
            assert torch.allclose(encoded.keys["context_whole"][LAYER][row], explicit, atol=1e-4, rtol=1e-5)
    assert torch.equal(memory.context_states, states["write"].keys["context_whole"][LAYER])
    assert torch.equal(memory.context_lengths, states["write"].lengths["context_whole"])
    # A question that does not name the context keeps its last-token key, one token long.
    assert torch.equal(states["plain"].lengths["context_whole"], torch.ones(len(bindings), dtype=torch.long))
    assert torch.equal(states["plain"].keys["context_whole"][LAYER], states["plain"].keys["context"][LAYER])
    assert torch.equal(states["write"].subset(2).lengths["context_whole"], states["write"].lengths["context_whole"][:2])


def test_contexts_ending_in_the_same_word_are_told_apart_by_their_whole_phrase(smollm2):
    """The control that fails if pooling is cut: "Alice's notes" and "Bob's notes" end in the same token."""
    model, tokenizer, _ = smollm2
    labels = tasks.single_token_labels(tokenizer)
    bindings = [tasks.Binding("zorp", "Alice's notes", labels[0]), tasks.Binding("zorp", "Bob's notes", labels[1])]
    write = fb.encode_bindings(model, tokenizer, bindings, [LAYER], kinds=("write",), keep_cache=False)["write"]
    cosine = {key: float(torch.nn.functional.cosine_similarity(*fb.write_memory(
        model, tokenizer, write, bindings, LAYER, "single_step", context_key=key).context_states, dim=0))
        for key in fb.CONTEXT_KEYS}
    assert cosine["whole"] < cosine["last_token"]
    assert fb.write_memory(model, tokenizer, write, bindings, LAYER, "single_step").context_lengths.tolist() == [3, 3]
    with pytest.raises(ParameterError, match="last_token"):
        fb.write_memory(model, tokenizer, write, bindings, LAYER, "single_step", context_key="first_token")


def test_gate_injects_nothing_on_prompts_without_the_stored_word_or_context(smollm2, written, gated):
    model, tokenizer, _ = smollm2
    bindings, states, _, _ = written
    projector, memory, gate, unrelated = gated
    for no_cue in (states["plain"], unrelated):  # the word without a context; neither word nor context
        values, index = fb.select_values(memory, "gated", no_cue, LAYER, projector, gate=gate)
        assert (index == -1).all() and torch.equal(values, torch.zeros_like(values))
        assert fb.generate(model, tokenizer, no_cue, values) == fb.generate(model, tokenizer, no_cue, None)
    values, index = fb.select_values(memory, "gated", states["read"], LAYER, projector, gate=gate)
    assert (index == torch.arange(len(bindings))).float().mean() >= 0.8  # the control: with both cues it injects
    with pytest.raises(ParameterError, match="ContextGate"):
        fb.select_values(memory, "gated", states["read"], LAYER, projector)


def test_oracle_rows_receive_only_their_oracle(smollm2, written, gated):
    model, tokenizer, _ = smollm2
    bindings, states, _, _ = written
    projector, memory, gate, unrelated = gated
    no_context = [None] * len(bindings)
    oracle = fb.select_values(memory, "context_gate", states["plain"], LAYER, projector, no_context)
    blind = fb.select_values(memory, "both_top1", states["plain"], LAYER, projector)
    assert torch.equal(oracle[1], blind[1])  # a prompt that names no context gets no help from the oracle
    reference = {"plain": fb.generate(model, tokenizer, states["plain"], None),
                 "unrelated": fb.generate(model, tokenizer, unrelated, None)}
    labels = sorted({b.label for b in bindings})
    rows = {mode: fb.score_columns(model, tokenizer, memory, mode, states, unrelated, bindings, LAYER, projector,
                                   reference, labels) for mode in ("context_gate", "both_top1")}
    for column in ("plain_any", "plain_changed", "unrelated_any", "unrelated_changed"):
        assert torch.equal(rows["context_gate"][column], rows["both_top1"][column]), column


def test_projected_keys_are_computed_once_at_write_time(smollm2, written, gated):
    model, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    projector = gated[0]
    seen = []
    handle = projector.register_forward_hook(lambda module, args, output: seen.append(args[0].data_ptr()))
    try:
        projected = fb.write_memory(model, tokenizer, states["write"], bindings, LAYER, projector=projector)
        assert seen.count(projected.symbol_states.data_ptr()) == 1
        for _ in range(3):
            fb.select_values(projected, "both_top1", states["read"], LAYER, projector)
            fb.select_values(projected, "gated", states["read"], LAYER, projector, gate=gated[2])
        prompt = tasks.read_prompt(bindings[0])
        batch = {k: v for k, v in fv.encode_prompts(model, tokenizer, [prompt]).items() if k != "position_ids"}
        key_position = len(tokenizer.encode(fb.key_prefix(prompt, bindings[0].word))) - 1
        with fb.attached(model, projected, projector, LAYER, key_position):
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert seen.count(projected.symbol_states.data_ptr()) == 1
        assert len(seen) == 1 + 3 * 2 + 1  # after writing: one projection of the queries per read
    finally:
        handle.remove()
    with pytest.raises(ParameterError, match="project"):
        fb.select_values(memory, "both_top1", states["read"], LAYER, projector)


def test_codebook_replaces_the_head_input_inside_its_radius_only(written, gated):
    bindings, states, memory, _ = written
    unrelated = gated[3]
    codebook = fb.grace_codebook(memory, states["write"], initial_threshold=0.5)
    values, index = fb.select_values(memory, "grace", states["write"], LAYER, codebook=codebook)
    assert torch.equal(index, torch.arange(len(bindings)))  # each statement is inside its own entry's radius
    assert torch.allclose(states["write"].answer.head_input + values, codebook.replacements, atol=1e-5)
    values, index = fb.select_values(memory, "grace", unrelated, LAYER, codebook=codebook)
    assert (index == -1).all() and torch.equal(values, torch.zeros_like(values))


def test_knn_copy_answers_with_the_retrieved_label_token(smollm2, written, gated):
    model, tokenizer, _ = smollm2
    bindings, states, _, _ = written
    projector, memory, _, unrelated = gated
    reference = {"plain": fb.generate(model, tokenizer, states["plain"], None),
                 "unrelated": fb.generate(model, tokenizer, unrelated, None)}
    scores = fb.score_columns(model, tokenizer, memory, fb.COPY_MODE, states, unrelated, bindings, LAYER, projector,
                              reference, sorted({b.label for b in bindings}))
    _, index = fb.select_values(memory, "both_top1", states["read"], LAYER, projector)
    retrieved_right = torch.tensor([float(memory.bindings[i] == b) for i, b in zip(index.tolist(), bindings)])
    assert torch.equal(scores["read_token"], retrieved_right) and torch.equal(scores["retrieval"], retrieved_right)
    assert scores["unrelated_any"].mean() >= 0.9  # it always copies: a stored label on unrelated questions


def test_context_gate_only_retrieves_the_query_context(written, gated):
    bindings, states, _, _ = written
    projector, memory = gated[:2]
    contexts = ["game B"] * len(bindings)
    _, index = fb.select_values(memory, "context_gate", states["read"], LAYER, projector, contexts)
    assert all(memory.bindings[i].context == "game B" for i in index.tolist())
    with pytest.raises(ParameterError, match="oracle"):
        fb.select_values(memory, "context_gate", states["read"], LAYER, projector)
    with pytest.raises(ParameterError, match="unknown memory mode"):
        fb.select_values(memory, "top5", states["read"], LAYER, projector)


def test_projector_learns_to_separate_training_bindings():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(30, 64, generator=generator)
    stored, queries = base + 0.3 * torch.randn(30, 64, generator=generator), base + 0.3 * torch.randn(30, 64, generator=generator)
    projector = fb.train_projector(queries, stored, key_dim=16, steps=200, seed=0)
    index, _ = fb.retrieve(projector(queries), projector(stored))
    assert (index == torch.arange(30)).float().mean() >= 0.9


def test_public_functions_accept_custom_contexts_and_templates(tiny_neox):
    model, tokenizer, _ = tiny_neox
    templates = tasks.Templates(write="On planet {context} the word {word} stands for {label}",
                                read="Q: on planet {context}, {word} stands for what? A:",
                                plain="Q: {word} stands for what? A:", unrelated=("Q: what is up? A:",))
    bindings = tasks.make_bindings(["zorp", "quib"], ("Mars", "Venus"), ("red", "blue", "green"), seed=0)
    states = fb.encode_bindings(model, tokenizer, bindings, [1], templates)
    assert tasks.write_prompt(bindings[0], templates) == "On planet Mars the word zorp stands for"
    memory = fb.write_memory(model, tokenizer, states["write"], bindings, 1, "single_step")
    projector = fb.train_projector(states["read"].keys["symbol"][1], states["write"].keys["symbol"][1], 8, 3)
    unrelated = fb.encode_unrelated(model, tokenizer, list(templates.unrelated), [1])
    reference = {"plain": fb.generate(model, tokenizer, states["plain"], None),
                 "unrelated": fb.generate(model, tokenizer, unrelated, None)}
    scores = fb.score_columns(model, tokenizer, memory.project(projector), "both_top1", states, unrelated, bindings, 1,
                              projector, reference, ["red", "blue", "green"])
    assert tuple(scores) == fb.COLUMNS
    assert all(len(v) == (len(bindings) if not k.startswith("unrelated") else 1) for k, v in scores.items())
    assert fb.in_context_prompts(bindings[:1], bindings, templates)[0].startswith("On planet Mars the word zorp stands for")


def test_saved_memory_reloads_bit_exact_and_generates_the_same(tiny_neox, tmp_path):
    model, tokenizer, info = tiny_neox
    bindings = tasks.make_bindings(["zorp", "quib", "blick"], ("Mars", "Venus"), ("red", "blue", "green"), seed=0)
    states = fb.encode_bindings(model, tokenizer, bindings, [1])
    projector = fb.train_projector(states["read"].keys["symbol"][1], states["write"].keys["symbol"][1], 8, 3)
    memory = fb.write_memory(model, tokenizer, states["write"], bindings, 1, "single_step", projector=projector)
    assert (memory.layer, memory.value_kind, memory.model) == (1, "single_step", info)
    loaded = fb.BindingMemory.load(memory.save(tmp_path / "memory.safetensors"), model)
    for name in ("symbol_states", "context_states", "values", "retrieval_keys", "context_lengths"):
        original, copy = getattr(memory, name), getattr(loaded, name)
        assert original.dtype == copy.dtype and torch.equal(original, copy), name
    assert (loaded.bindings, loaded.layer, loaded.value_kind, loaded.model) == (bindings, 1, "single_step", info)
    last_token = fb.write_memory(model, tokenizer, states["write"], bindings, 1, "single_step",
                                 context_key="last_token")
    assert last_token.context_lengths is None
    assert fb.BindingMemory.load(last_token.save(tmp_path / "last.safetensors"), model).context_lengths is None
    generations = []
    for stored in (memory, loaded):
        for mode in ("raw_both_top1", "both_top1"):
            values, _ = fb.select_values(stored, mode, states["read"], 1, projector)
            generations.append(fb.generate(model, tokenizer, states["read"], values, max_new_tokens=4))
    assert generations[:2] == generations[2:]


def test_empty_memory_round_trips_and_an_unattributed_memory_cannot_be_saved(tiny_neox, tmp_path):
    model, _, info = tiny_neox
    empty = fb.BindingMemory.empty(info.width)
    with pytest.raises(ParameterError, match="model_info"):
        empty.save(tmp_path / "empty.safetensors")
    empty.model = info
    loaded = fb.BindingMemory.load(empty.save(tmp_path / "empty.safetensors"), model)
    assert len(loaded) == 0 and loaded.values.shape == (0, info.width)


def test_chapter_1_words_are_disjoint_from_chapter_2_words():
    """Onsets and codas are consonants and every onset is non-empty, so a word has one vowel run per syllable."""
    import re

    vowel_runs = lambda word: len(re.findall("[aeiou]+", word))
    chapter_1 = {w for seed in range(3) for w in tasks.nonce_words(500, seed, syllables=(3,))}
    chapter_2 = {w for seed in range(3) for w in tasks.nonce_words(500, seed)}
    assert {vowel_runs(w) for w in chapter_1} == {3} and {vowel_runs(w) for w in chapter_2} == {2}
    assert not chapter_1 & chapter_2


def test_first_word_strips_whitespace_and_punctuation():
    assert first_word("\n Red.") == "red"
    assert first_word("wolf-like") == "wolf"
    assert first_word("cowboy") == "cowboy"
    assert first_word("\n\n") == ""


def test_chapter_2_on_ci_parameters():
    values = glued_values(executed_ci_notebook("02_binding.ipynb"))
    names = ["binding_write_both_top1", "binding_read_both_top1", "binding_plain_any_both_top1",
             "binding_unrelated_changed_both_top1", "binding_read_context_gate", "binding_read_raw_both_top1",
             "binding_read_average", "binding_read_no_memory", "binding_read_in_context_2shot",
             "binding_read_forced_choice_in_context_2shot", "binding_read_gated", "binding_plain_any_gated",
             "binding_plain_changed_gated", "binding_unrelated_changed_gated", "binding_read_unseen_templates_gated",
             "binding_read_unseen_contexts_gated"]
    for name in names:
        assert 0.0 <= values[name] <= 1.0, name
    assert values["binding_read_context_gate"] >= values["binding_read_both_top1"] - 0.05
    assert values["binding_read_both_top1"] >= values["binding_read_no_memory"] + 0.3
    assert values["binding_read_gated"] >= values["binding_read_no_memory"] + 0.3
    assert values["binding_unrelated_changed_gated"] <= values["binding_unrelated_changed_both_top1"] - 0.5
    for size in ("1k", "100k", "1m"):
        assert values[f"binding_overhead_ratio_{size}"] > 0
    assert values["binding_write_token_both_top1"] >= 0.9
    assert values["binding_write_token_both_top1"] >= values["binding_write_both_top1"]
    for mode in ("both_top1", "context_gate", "raw_both_top1", "average"):
        for kind in ("single_step", "iterated"):
            name = f"binding_seed_exact_read_{mode}_{kind}"
            assert values[f"{name}_low"] <= values[name] <= values[f"{name}_high"], name
    # The iterated value moves the answer on the seed's own task.
    assert values["binding_seed_exact_read_both_top1_iterated"] >= values["binding_seed_exact_read_no_memory"] + 0.3
    assert 0.0 <= values["binding_served_false_open_low"] <= values["binding_served_false_open"] <= 1.0
    # The served gate's positive control: it opens on its own read questions.
    assert values["binding_served_control_open"] >= 0.5
    assert 0.0 <= values["binding_read_gated_20"] <= 1.0  # the largest memory of the ci parameters


def test_chapter_2_runs_unmodified_on_the_paper_architecture(tmp_path):
    """params/paper/02.yaml names Pythia-70M (hub only): its GPT-NeoX code path, on random weights."""
    from fastmem.book import ROOT, execute, resolve_parameters

    notebook = ROOT / "notebooks" / "02_binding.ipynb"
    parameters = {**resolve_parameters(notebook, "ci")[0], "model_name": "tiny-gpt-neox", "key_layer": 1,
                  "n_train_words": 6, "n_calibration_words": 4, "n_eval_words": 4, "capacity_sizes": [1, 8],
                  "capacity_probe": 4, "overhead_entries": [100, 1000], "overhead_new_tokens": 2, "overhead_repeats": 1,
                  "n_seed_words": 4, "n_seed_transfer_words": 2, "tradeoff_alphas": [1.0], "n_served_turns": 4,
                  "n_served_sentences": 4, "param_set": "tiny-paper-architecture"}
    values = glued_values(execute(notebook, tmp_path / notebook.name, parameters))
    for name in ("binding_read_both_top1", "binding_read_context_gate", "binding_read_gated", "binding_write_token_both_top1",
                 "binding_seed_exact_read_both_top1_single_step", "binding_served_false_open"):
        assert 0.0 <= values[name] <= 1.0, name
    assert values["binding_overhead_ratio_1k"] > 0


def test_retrieval_over_10000_entries_matches_brute_force():
    """Capacity to 10,000 bindings: the one-product retrieval picks the same top-1 as a loop over entries."""
    generator = torch.Generator().manual_seed(1)
    keys, queries = torch.randn(10_000, 128, generator=generator), torch.randn(6, 128, generator=generator)
    index, best = fb.retrieve(queries, keys)
    for row, query in enumerate(queries):
        cosines = [float(torch.dot(query, key) / (query.norm() * key.norm())) for key in keys]
        assert index[row].item() == max(range(len(cosines)), key=cosines.__getitem__)
        assert abs(best[row].item() - max(cosines)) < 1e-5


def test_memory_followed_by_a_pool_keeps_order_and_is_projected_once(written, gated):
    _, states, memory, _ = written
    projector = gated[0]
    joined = memory.followed_by(memory.head(2))
    assert joined.retrieval_keys is None and len(joined) == len(memory) + 2
    assert torch.equal(joined.context_lengths, torch.cat([memory.context_lengths, memory.context_lengths[:2]]))
    last_token = fb.BindingMemory(memory.symbol_states, memory.context_states, memory.values, memory.bindings)
    assert last_token.followed_by(last_token).context_lengths is None
    assert last_token.followed_by(memory.head(2)).context_lengths.tolist() == \
        [1] * len(memory) + memory.context_lengths[:2].tolist()
    assert torch.equal(joined.symbol_states[len(memory):], memory.symbol_states[:2])
    assert joined.bindings == memory.bindings + memory.bindings[:2]
    joined.project(projector)
    assert torch.allclose(joined.head(len(memory)).learned_keys(), gated[1].learned_keys(), atol=1e-6)


def test_writing_a_fact_takes_no_gradient_and_leaves_weights_bit_identical(tiny_neox):
    """Seed 002's "no backpropagation": even with every weight open to gradients, a write leaves no trace."""
    model, tokenizer, _ = tiny_neox
    bindings = tasks.make_bindings(["zorp", "quib"], ("Mars", "Venus"), ("red", "blue", "green"), seed=0)
    states = fb.encode_bindings(model, tokenizer, bindings, [1], keep_cache=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(True)
    try:
        memory = fb.write_memory(model, tokenizer, states["write"], bindings, 1)
        assert memory.values.grad_fn is None and not memory.values.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def test_grace_radius_is_fitted_after_the_shrink_and_separates_reads_from_unrelated(written, gated):
    bindings, states, memory, _ = written
    unrelated = gated[3]
    # The write statements as read questions: each lands exactly on its own entry (cosine 1).
    radius = fb.fit_grace_threshold(memory, states["write"], unrelated, unrelated, LAYER, bindings)
    codebook = fb.grace_codebook(memory, states["write"], radius)
    assert torch.equal(fb.select_values(memory, "grace", states["write"], LAYER, codebook=codebook)[1],
                       torch.arange(len(bindings)))
    assert (fb.select_values(memory, "grace", unrelated, LAYER, codebook=codebook)[1] == -1).all()
    # Shrunk radii never fall below the initial one, and reach halfway to the nearest conflicting key.
    labels = [b.label for b in bindings]
    radii = fb.grace_radii(memory.symbol_states, labels, radius)
    assert (radii >= radius).all()
    keys = torch.nn.functional.normalize(memory.symbol_states, dim=-1)
    other = keys[1] if labels[1] != labels[0] else keys[2]
    assert radii[0] >= (1 + float(keys[0] @ other)) / 2 - 1e-6


def test_overhead_measurement_sees_a_known_slowdown(tiny_neox, monkeypatch):
    """The cost section's positive control: a pause on every forward pass, and none once it is removed."""
    import time

    model, tokenizer, _ = tiny_neox
    batch = {k: v for k, v in fv.encode_prompts(model, tokenizer, ["a b c"]).items() if k != "position_ids"}
    generate = lambda: model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with fb.slowed(model, 0.02):
        start = time.perf_counter()
        generate()
        assert time.perf_counter() - start >= 3 * 0.02  # three forward passes, each paused
    start = time.perf_counter()
    fb.busy_pause(0.01)
    assert 0.01 <= time.perf_counter() - start < 0.05  # the pause lasts what it says
    pauses = []
    monkeypatch.setattr(fb.cost, "busy_pause", pauses.append)
    generate()
    assert pauses == []  # the pause is gone once the block ends
    with fb.slowed(model, 0.5):
        generate()
    assert pauses == [0.5] * 3
    assert fb.retrieval_flops(10, 4, 2) == 2 * (4 * 2 + 10 * 2)
    assert fb.forward_flops_per_token(model) >= 2 * model.get_output_embeddings().weight.numel()


@pytest.fixture(scope="module")
def pool(smollm2):
    """Pool bindings in two templates and two contexts, written by write_pool and one statement at a time."""
    model, tokenizer, _ = smollm2
    labels = tasks.single_token_labels(tokenizer)
    bindings = tasks.make_family_bindings(tasks.nonce_words(4, 11), tasks.CONTEXT_PAIRS[:2], labels, 11)
    templates = tasks.templates_for(bindings, tasks.template_family([0, 1]))
    alone = fb.encode_bindings(model, tokenizer, bindings, [LAYER], templates, ("write",), keep_cache=False)
    reference = fb.write_memory(model, tokenizer, alone["write"], bindings, LAYER)
    return fb.write_pool(model, tokenizer, bindings, templates, LAYER), reference, (bindings, templates, alone)


@pytest.mark.parametrize("context_key", fb.CONTEXT_KEYS)
def test_pool_written_in_shared_passes_matches_writing_each_statement(smollm2, pool, context_key):
    """Capacity's cheap pool: shared prefixes and length batches give the same keys and values."""
    model, tokenizer, _ = smollm2
    written, reference, (bindings, templates, alone) = pool
    if context_key != "whole":
        written = fb.write_pool(model, tokenizer, bindings, templates, LAYER, context_key=context_key)
        reference = fb.write_memory(model, tokenizer, alone["write"], bindings, LAYER, context_key=context_key)
    assert written.memory.bindings == reference.bindings
    for name in ("symbol_states", "context_states"):
        assert torch.allclose(getattr(written.memory, name), getattr(reference, name), atol=2e-3, rtol=1e-4), name
    if context_key == "whole":
        assert torch.equal(written.memory.context_lengths, reference.context_lengths)
        assert (reference.context_lengths > 1).any()  # some contexts span several tokens: pooling is tested
    else:
        assert written.memory.context_lengths is None and reference.context_lengths is None
    assert not written.computed.any()  # no value is computed before it is needed
    values = written.compute_values(model)
    assert torch.allclose(values, reference.values, atol=5e-3, rtol=1e-3)


def test_pool_values_are_computed_once_on_first_retrieval(smollm2, pool, monkeypatch):
    model, _, _ = smollm2
    written = fb.Pool(fb.BindingMemory(*(t.clone() for t in (pool[0].memory.symbol_states,
                                                              pool[0].memory.context_states,
                                                              torch.zeros_like(pool[0].memory.values))),
                                       pool[0].memory.bindings, LAYER, "iterated",
                                       context_lengths=pool[0].memory.context_lengths),
                      pool[0].head_input, pool[0].targets, torch.zeros(len(pool[0]), dtype=torch.bool), 4.0, 5)
    calls = []
    compute = fb.memory_values
    monkeypatch.setattr(fb.capacity, "memory_values", lambda *args: calls.append(len(args[1])) or compute(*args))
    first = written.compute_values(model, torch.tensor([3, 1, 3]))
    again = written.compute_values(model, torch.tensor([1, 3]))
    assert calls == [2] and torch.equal(first, again)
    assert written.computed.tolist() == [i in (1, 3) for i in range(len(written))]
    assert torch.equal(written.memory.values[0], torch.zeros_like(written.memory.values[0]))


def test_capacity_with_values_on_first_retrieval_matches_every_value_written(smollm2, written, gated, pool):
    model, tokenizer, _ = smollm2
    bindings, states, memory, _ = written
    projector, _, gate, _ = gated
    deferred = fb.Pool(fb.BindingMemory(pool[0].memory.symbol_states, pool[0].memory.context_states,
                                        torch.zeros_like(pool[0].memory.values), pool[0].memory.bindings,
                                        LAYER, "iterated", context_lengths=pool[0].memory.context_lengths),
                       pool[0].head_input, pool[0].targets, torch.zeros(len(pool[0]), dtype=torch.bool), 4.0, 5)
    complete = fb.Pool(fb.BindingMemory(pool[0].memory.symbol_states, pool[0].memory.context_states,
                                        pool[1].values, pool[0].memory.bindings, LAYER, "iterated",
                                        context_lengths=pool[0].memory.context_lengths),
                       pool[0].head_input, pool[0].targets, torch.ones(len(pool[0]), dtype=torch.bool), 4.0, 5)
    sizes = [2, len(bindings), len(bindings) + len(pool[0])]
    runs = [fb.capacity_records(model, tokenizer, bindings, states["read"], memory, p, projector, gate, LAYER,
                                sizes, max_new_tokens=2) for p in (deferred, complete)]
    assert [r["read"] for r in runs[0]] == [r["read"] for r in runs[1]]
    assert [r["retrieval"] for r in runs[0]] == [r["retrieval"] for r in runs[1]]
    assert len(runs[0]) == len(fb.CAPACITY_MODES) * (2 + 2 * len(bindings))


def test_overhead_ratios_come_from_interleaved_repetitions_and_see_a_doubling(tiny_neox):
    """Chapter 2's timing uses chapter 3's timing_ratio; a control that doubles each pass reads about 2."""
    model, tokenizer, _ = tiny_neox
    batch = {k: v for k, v in fv.encode_prompts(model, tokenizer, ["a b c"]).items() if k != "position_ids"}
    width = model.config.hidden_size
    memories = {10: fb.synthetic_memory(10, width, 4, 0)}
    projector = fb.KeyProjector(width, 4, 0)
    timing = fb.measure_overhead(model, batch, memories, projector, 1, 2, new_tokens=4, repeats=5,
                                 control_slowdown=1.0, n_boot=200)
    assert set(timing) == {"plain_s", "seconds", "control", 10}
    ratio, low, high = timing["control"]
    assert low <= ratio <= high and ratio > 1.5
    assert timing[10][0] > 0 and set(timing["seconds"]) == {"plain", "control", 10}


def test_score_records_count_an_unrelated_question_once_across_seeds():
    """The cluster bootstrap's units: a binding's prompts belong to its seed, an unrelated question to no seed."""
    bindings = [tasks.Binding("zorp", "Mars", "red")]
    scores = {"read": torch.tensor([1.0]), "unrelated_any": torch.tensor([0.0, 1.0])}
    records = [r for seed in (0, 1) for r in fb.score_records(seed, "seen", "gated", scores, bindings, ["q1", "q2"])]
    read_units = {r["unit"] for r in records if r["column"] == "read"}
    unrelated_units = {r["unit"] for r in records if r["column"] == "unrelated_any"}
    assert read_units == {"0:zorp:Mars", "1:zorp:Mars"} and unrelated_units == {"q:q1", "q:q2"}
    assert [r["score"] for r in records if r["column"] == "unrelated_any"] == [0.0, 1.0, 0.0, 1.0]
    assert fb.paired_cosine(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])).tolist() == [1.0, 0.0]


def _prompt_batch(model, tokenizer, prompt):
    batch = {k: v for k, v in fv.encode_prompts(model, tokenizer, [prompt]).items() if k != "position_ids"}
    hidden = model(**batch, output_hidden_states=True).hidden_states[LAYER + 1]
    return batch, hidden, batch["attention_mask"].bool()


@torch.no_grad()
def test_served_gated_memory_chooses_as_the_chapter_2_gate_does(smollm2, written, gated):
    """Read inside the forward pass, the selective memory injects for the same prompts and entries as
    ``select_values(mode="gated")`` on the cached states: reads inject, plain and unrelated do not."""
    model, tokenizer, _ = smollm2
    bindings, states, _, _ = written
    projector, memory, gate, _ = gated
    templates = tasks.Templates()
    for kind, prompts in (("read", [tasks.read_prompt(b) for b in bindings]),
                          ("plain", [tasks.plain_prompt(b) for b in bindings]),
                          ("unrelated", list(templates.unrelated[12:18]))):
        query = fb.encode_unrelated(model, tokenizer, prompts, [LAYER]) if kind == "unrelated" else states[kind]
        expected = fb.select_values(memory, "gated", query, LAYER, projector, gate=gate)[1]
        for row, prompt in enumerate(prompts):
            anchor = bindings[row].word if kind != "unrelated" else None
            key_position = len(tokenizer.encode(fb.key_prefix(prompt, anchor))) - 1
            _, hidden, real = _prompt_batch(model, tokenizer, prompt)
            served = fb.ServedBinding(model, memory, LAYER, projector, gate=gate, key_position=key_position)
            assert served.values_for(hidden, real)[1].item() == expected[row].item(), (kind, row)
    assert (expected == -1).all()
    ungated = fb.ServedBinding(model, memory, LAYER, projector, key_position=key_position)
    assert ungated.values_for(hidden, real)[1].item() >= 0  # without the gate the same prompt gets a value


@torch.no_grad()
def test_served_gated_memory_leaves_unrelated_text_bit_identical_and_answers_its_reads(smollm2, written, gated):
    model, tokenizer, _ = smollm2
    bindings, _, _, _ = written
    projector, memory, gate, _ = gated
    served = fb.ServedBinding(model, memory, LAYER, projector, gate=gate, key_position=None)
    unrelated = tasks.Templates().unrelated[12]
    batch, _, _ = _prompt_batch(model, tokenizer, unrelated)
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with served:
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), plain)
    assert int(served.injected) == 0
    labels = [b.label for b in bindings]
    answers = []
    for b in bindings:
        batch, _, _ = _prompt_batch(model, tokenizer, tasks.read_prompt(b))
        with served:
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        answers.append(tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    assert int(served.injected) >= len(bindings) - 1  # with no known key position the gate still opens on reads
    assert fb.exact_match(answers, labels).mean() >= 0.6


def test_score_records_resample_a_word_with_both_of_its_prompts():
    """Chapter 2's items: a word's prompts in both contexts are one item; an unrelated question is its own."""
    bindings = [tasks.Binding("zorp", "Mars", "red"), tasks.Binding("zorp", "Venus", "blue")]
    scores = {"read": torch.tensor([1.0, 0.0]), "unrelated_any": torch.tensor([0.0])}
    records = fb.score_records(3, "seen", "gated", scores, bindings, ["q1"])
    assert [r["item"] for r in records] == ["3:zorp", "3:zorp", "q:q1"]
    assert [r["unit"] for r in records][:2] == ["3:zorp:Mars", "3:zorp:Venus"]


def _scores_frame():
    import pandas as pd

    rows = []
    for seed in (0, 1):
        for word in range(6):
            for context, hit in (("A", word % 2), ("B", 1)):
                for row, score in (("both_top1", hit), ("raw_both_top1", 0.0)):
                    rows.append({"seed": seed, "experiment": "seen", "row": row, "column": "read",
                                 "unit": f"{seed}:w{word}:{context}", "item": f"{seed}:w{word}", "score": score})
    return pd.DataFrame(rows)


def test_rate_intervals_keep_the_seeds_fixed_and_resample_items():
    """With seeds fixed, a seed whose items all score the same has no spread; resampling seeds would add one."""
    import pandas as pd

    frame = pd.DataFrame([{"seed": seed, "experiment": "seen", "row": "gated", "column": "read",
                           "unit": f"{seed}:w{i}:A", "item": f"{seed}:w{i}", "score": float(seed)}
                          for seed in (0, 1) for i in range(8)])
    fixed = fb.rate_intervals(frame, 500)[("seen", "gated", "read")]
    resampled = fb.rate_intervals(frame, 500, seeds_fixed=False)[("seen", "gated", "read")]
    assert fixed == (0.5, 0.5, 0.5)
    assert resampled[0] == 0.5 and resampled[1] < 0.5 < resampled[2]


def test_paired_rows_align_two_memories_on_the_same_prompts():
    frame = _scores_frame()
    paired = fb.paired_rows(frame.sample(frac=1.0, random_state=0), "seen", "read", ["both_top1", "raw_both_top1"])
    assert len(paired) == 24 and {"seed", "unit", "item"} <= set(paired.columns)
    assert paired["raw_both_top1"].eq(0.0).all()
    expected = [1.0 if unit.endswith(":B") else float(int(unit.split(":")[1][1:]) % 2) for unit in paired["unit"]]
    assert paired["both_top1"].tolist() == expected
    with pytest.raises(KeyError):
        fb.paired_rows(frame, "seen", "read", ["both_top1", "gated"])


def test_the_earlier_comparison_rule_is_decided_as_chapter_2_decided_it():
    """The plan's ``below`` kind, kept for chapter 2's earlier rules, is stats.verdict_below on glued triples."""
    from fastmem import stats, verdicts

    rule = {"kind": "below", "worse": {"mean": "wm", "low": "wl", "high": "wh"},
            "better": {"mean": "bm", "low": "bl", "high": "bh"}}
    for worse in ((0.51, 0.43, 0.60), (0.30, 0.20, 0.40), (0.90, 0.85, 0.95), (0.60, 0.50, 0.70)):
        better = (0.556, 0.47, 0.64)
        glued = dict(zip(("wm", "wl", "wh", "bm", "bl", "bh"), (*worse, *better)))
        assert verdicts.decide_rule(rule, glued) == stats.verdict_below(worse, better)


@torch.no_grad()
def test_served_opens_counts_the_prompts_its_hooks_inject_into(smollm2, written, gated):
    """``opens`` reads the states the read hook sees: over read, plain and unrelated prompts it marks
    exactly the prompts into which the attached memory injects."""
    model, tokenizer, _ = smollm2
    bindings, _, _, _ = written
    projector, memory, gate, _ = gated
    prompts = ([tasks.read_prompt(b) for b in bindings] + [tasks.plain_prompt(b) for b in bindings[:2]]
               + list(tasks.Templates().unrelated[20:24]))
    served = fb.ServedBinding(model, memory, LAYER, projector, gate=gate, key_position=None)
    reading = served.opens(fb.prompt_states(model, tokenizer, prompts, {}, [LAYER]))
    opened = reading.opened
    assert torch.equal(opened, reading.context * reading.word)
    injected = []
    for prompt in prompts:
        batch, _, _ = _prompt_batch(model, tokenizer, prompt)
        before = int(served.injected)
        with served:
            model(**batch)
        injected.append(float(int(served.injected) - before))
    assert opened.tolist() == injected
    assert opened[:len(bindings)].sum() >= len(bindings) - 1 and opened[len(bindings):].sum() == 0


def _tradeoff_frame():
    import pandas as pd

    # Two read and two plain prompts, one scale: the memory answers every read and fires on every
    # plain question; without it, nothing. Cosines decide which prompts a threshold keeps.
    rows = [{"seed": 0, "value": "iterated", "alpha": 1.0, "column": column, "unit": i, "cosine": cosine,
             "with_memory": 1.0, "without": 0.0}
            for column, cosines in (("read", (0.9, 0.5)), ("plain", (0.8, 0.2))) for i, cosine in enumerate(cosines)]
    return pd.DataFrame(rows)


def test_tradeoff_curve_falls_back_to_the_memory_free_answer_below_the_threshold():
    points = {p.threshold: p for p in fb.tradeoff_curve(_tradeoff_frame(), [-1.0, 0.4, 0.6, 0.85, 0.95])}
    assert (points[-1.0].read, points[-1.0].plain_any) == (1.0, 1.0)  # always injected
    assert (points[0.4].read, points[0.4].plain_any) == (1.0, 0.5)
    assert (points[0.6].read, points[0.6].plain_any) == (0.5, 0.5)
    assert (points[0.85].read, points[0.85].plain_any) == (0.5, 0.0)
    assert (points[0.95].read, points[0.95].plain_any) == (0.0, 0.0)
    front = fb.pareto_front(list(points.values()))
    assert [(p.plain_any, p.read) for p in front] == [(0.0, 0.5), (0.5, 1.0)]
    assert fb.seed_reading(list(points.values()), 0.5, 0.05) == "iterated value at scale 1"
    assert fb.seed_reading(list(points.values()), 0.9, 0.05) == "nowhere on the curve"


def test_seed_table_quotes_the_seed_beside_ours():
    summary = {("seen", fb.seed_row(mode, kind), column): (0.5, 0.4, 0.6)
               for mode in fb.SEED_MODES for kind in fb.SEED_VALUES
               for column in ("write", "read", "plain_own", "unrelated_retrieved")}
    table = fb.seed_table(summary, "seen")
    assert len(table) == 3 * len(fb.SEED_MODES)
    seed_row = table.iloc[0]
    assert seed_row["row"] == "both_top1: seed 000" and seed_row["Read"] == "0.805" and seed_row["Plain"] == "0.008"
    assert table.iloc[1]["Read"] == "0.500 [0.400, 0.600]"


@torch.no_grad()
def test_generation_stops_once_every_first_word_is_whole_and_scores_the_same(smollm2, written, monkeypatch):
    """Stopping a batch when every continuation holds a whole first word changes no first word."""
    from fastmem.binding import scoring
    from fastmem.evaluation import first_word, first_word_complete

    model, tokenizer, _ = smollm2
    _, states, memory, _ = written
    assert first_word_complete(" cat\n") and first_word_complete("\n Red.") and not first_word_complete(" cat")
    assert not first_word_complete("\n\n")
    values = fb.select_values(memory, "raw_both_top1", states["read"], LAYER)[0]
    stopped = fb.generate(model, tokenizer, states["read"], values, 5)
    monkeypatch.setattr(scoring, "first_word_complete", lambda text: False)
    full = fb.generate(model, tokenizer, states["read"], values, 5)
    assert [first_word(t) for t in stopped] == [first_word(t) for t in full]
    assert all(f.startswith(s) for s, f in zip(stopped, full))
