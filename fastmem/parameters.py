"""Chapter parameters: what each may hold, checked before a run starts (book page "Re-running a chapter").

Every chapter's first code cell (tagged ``parameters``) holds literals only. Its names, and what
each may hold, are declared here once per chapter (:data:`CHAPTER_RULES`); ``python -m
fastmem.book`` checks a parameter set against them before any kernel starts, and each chapter calls
:func:`check_parameters` right after its parameters cell, so that a chapter edited by hand in
Jupyter is checked the same way. A bad value ends with one line naming the parameter, its value and
what is allowed.
"""

from __future__ import annotations

import ast
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ParameterError
from .names import ATTRACTOR_INITS, ATTRACTOR_SITES, KNOWN_MODELS, LATENT_METHODS, VALUE_KINDS


@dataclass(frozen=True)
class Rule:
    """What one parameter may hold: a test and the words that describe it (all chapters)."""

    allowed: str
    test: Callable[[object], bool]

    def check(self, name: str, value) -> None:
        """Raise :class:`ParameterError` with one line unless ``value`` is allowed (all chapters)."""
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ParameterError(f"parameter {name} = {value!r} is not allowed: {self.allowed}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int = 0) -> Rule:
    """An integer of at least ``minimum`` (all chapters)."""
    return Rule(f"an integer >= {minimum}",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum)


def count() -> Rule:
    """A count: an integer >= 1 (all chapters)."""
    return integer(1)


def number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None) -> Rule:
    """A finite number in ``[minimum, maximum]``, or strictly above ``above`` (all chapters)."""
    words = ["a finite number"]
    if above is not None:
        words.append(f"> {above}")
    if minimum is not None:
        words.append(f">= {minimum}")
    if maximum is not None:
        words.append(f"<= {maximum}")
    return Rule(" ".join(words) if len(words) < 3 else f"{words[0]} in [{minimum}, {maximum}]",
                lambda v: _is_number(v) and (above is None or v > above) and (minimum is None or v >= minimum)
                and (maximum is None or v <= maximum))


def rate() -> Rule:
    """A rate or share in [0, 1] (all chapters)."""
    return number(0, 1)


def text() -> Rule:
    """Any string (all chapters)."""
    return Rule("a string", lambda v: isinstance(v, str))


def flag() -> Rule:
    """True or False (all chapters)."""
    return Rule("true or false", lambda v: isinstance(v, bool))


def one_of(options) -> Rule:
    """One of a fixed set of names (all chapters)."""
    options = tuple(options)
    return Rule(f"one of {', '.join(map(repr, options))}", lambda v: v in options)


def list_of(rule: Rule, *, distinct: bool = False) -> Rule:
    """A non-empty list whose every item ``rule`` allows (all chapters)."""
    words = f"a non-empty list{' of distinct items' if distinct else ''}, each {rule.allowed}"
    return Rule(words, lambda v: isinstance(v, list) and len(v) > 0 and all(rule.test(x) for x in v)
                and (not distinct or len(set(map(repr, v))) == len(v)))


def mapping_of(rule: Rule) -> Rule:
    """A non-empty mapping from names to values that ``rule`` allows (all chapters)."""
    return Rule(f"a non-empty mapping of names to values, each {rule.allowed}",
                lambda v: isinstance(v, dict) and len(v) > 0 and all(isinstance(k, str) and rule.test(x)
                                                                      for k, x in v.items()))


def optional(rule: Rule) -> Rule:
    """None (``null`` in YAML) or what ``rule`` allows (all chapters)."""
    return Rule(f"null or {rule.allowed}", lambda v: v is None or rule.test(v))


def model_name() -> Rule:
    """A model :func:`fastmem.models.load_model` can be asked for: a known name, a hub id or a folder (all chapters)."""
    return Rule(f"one of {', '.join(KNOWN_MODELS)}, a hub id 'owner/name' or a local folder",
                lambda v: isinstance(v, str) and bool(v) and (v in KNOWN_MODELS or "/" in v or v.startswith((".", "~"))))


CHAPTER_RULES: dict[str, dict[str, Rule]] = {
    "01": {
        "param_set": text(), "model_name": model_name(), "untied_model_name": model_name(),
        "n_words": count(), "seed": integer(0), "alphas": list_of(number()),
        "iterated_step": number(above=0), "iterated_steps": count(), "top_k": count(),
        "min_norm_margin": number(0), "earlier_block_offset": count(), "earlier_alphas": list_of(number()),
        "n_winners_shown": count(),
    },
    "02": {
        "param_set": text(), "model_name": model_name(), "seeds": list_of(integer(0), distinct=True),
        "n_train_words": count(), "n_calibration_words": count(), "n_eval_words": count(),
        "n_calibration_unrelated": count(), "key_layer": integer(0), "key_dim": count(),
        "projector_steps": count(), "value_kind": one_of(VALUE_KINDS), "single_step_alpha": number(above=0),
        "iterated_step": number(above=0), "iterated_steps": count(), "alpha": number(0),
        "max_new_tokens": count(), "alpha_sweep": list_of(number(0)),
        "capacity_sizes": list_of(count()), "capacity_probe": count(), "overhead_entries": list_of(count()),
        "overhead_new_tokens": count(), "overhead_repeats": count(), "n_bootstrap": count(),
        "n_seed_words": count(), "n_seed_transfer_words": count(), "tradeoff_alphas": list_of(number(above=0)),
        "n_served_turns": integer(0), "n_served_sentences": integer(0),
    },
    "03": {
        "param_set": text(), "model_name": model_name(), "seed": integer(0), "n_threads": count(),
        "layer": integer(0), "site": one_of(ATTRACTOR_SITES), "n_attractors": count(),
        "feedback_strength": number(0), "gain": number(0), "pull": rate(), "decay": rate(),
        "activation_threshold": number(), "init": one_of(ATTRACTOR_INITS), "gate_threshold": number(-1, 1),
        "burn_in_passes": integer(0), "burn_in_strength": number(0), "operating_grid": list_of(number(0)),
        "operating_band": number(above=0), "dev_tokens": integer(2), "ppl_tokens": integer(2),
        "ppl_window": integer(2), "ppl_stride": count(), "timing_tokens": count(), "overhead_repeats": count(),
        "n_long_probes": count(), "long_seeds": list_of(integer(0), distinct=True), "n_noise_probes": count(),
        "long_tokens": count(),
        "recall_chunk": count(), "n_repetition_probes": count(),
        "strengths": list_of(number(above=0), distinct=True), "n_free_probes": count(), "free_tokens": count(),
        "free_answer_tokens": count(),
        "batch_size": count(), "n_comprehension": count(), "gated_strength_grid": list_of(number(above=0)),
        "n_dev_comprehension": count(), "answer_tokens": count(), "sweep_windows": count(),
        "sweep_window_tokens": integer(2), "sweep_n_attractors": list_of(count()),
        "sweep_activation_threshold": number(), "sweep_decays": list_of(rate()),
        "sensitivity": mapping_of(Rule("a non-empty list", lambda v: isinstance(v, list) and len(v) > 0)),
        "switch_passes": count(), "switch_passes_after": integer(2), "n_switch_pairs": count(),
        "n_snap_control_pairs": count(), "n_bootstrap": count(),
    },
    "04": {
        "param_set": text(), "model_name": model_name(), "device": one_of(("auto", "cpu", "cuda")), "threads": count(),
        "seeds": list_of(integer(0), distinct=True), "methods": list_of(one_of(LATENT_METHODS), distinct=True),
        "capacities": mapping_of(count()), "gammas": list_of(number(maximum=1, above=0), distinct=True),
        "primary_gamma": number(maximum=1, above=0), "inject_blocks": list_of(integer(0), distinct=True),
        "designs": list_of(one_of(("paper", "repaired")), distinct=True), "write_blocks": mapping_of(integer(0)),
        "decoder_inject_block": integer(0), "slot_top_k": count(),
        "turn_tokens": count(), "question_tokens": count(), "answer_tokens": count(), "max_new_tokens": count(),
        "n_train_questions": count(), "n_valid_questions": count(), "n_test_questions": count(),
        "n_format_questions": count(), "lr_grid": list_of(number(above=0), distinct=True),
        "weight_decay": number(0), "batch_size": count(), "max_steps": count(), "eval_every": count(),
        "patience": count(), "warmup_steps": integer(0), "grad_clip": number(above=0),
        "rag_k_grid": list_of(count(), distinct=True), "long_context_tokens": count(),
        "train_adversarial": flag(),
        "curriculum_conversations": count(), "curriculum_valid_conversations": count(),
        "curriculum_test_conversations": count(), "curriculum_facts": count(), "curriculum_filler_turns": count(),
        "curriculum_steps": integer(0), "curriculum_lr": number(above=0),
        "curriculum_eval_every": count(), "curriculum_patience": count(), "probe_train_banks": count(),
        "probe_test_banks": count(), "probe_epochs": count(), "gradient_steps": count(),
        "collapse_share": number(maximum=1, above=0),
        "synthetic_method": one_of(("m2", "m4", "m5", "m6")),
        "claimed_effect": number(above=0), "max_turns": integer(0),
    },
    "05": {
        "param_set": text(), "model_name": model_name(), "seed": integer(0), "threads": count(),
        "ppl_tokens": integer(2), "ppl_window": integer(2), "timing_tokens": count(), "overhead_repeats": count(),
        "n_essays": count(), "essay_tokens": count(), "n_comprehension": count(), "answer_tokens": count(),
        "batch_size": count(), "n_bootstrap": count(), "attractor_layer": integer(), "attractor_strength": number(0),
        "control_strength": number(above=0), "binding_layer": integer(0), "key_dim": count(),
        "projector_steps": count(), "n_train_words": count(), "n_calibration_words": count(),
        "n_calibration_unrelated": count(), "n_memory_words": count(), "value_kind": one_of(VALUE_KINDS),
        "iterated_step": number(above=0), "iterated_steps": count(), "binding_new_tokens": count(),
        "latent_method": one_of(("m2", "m4", "m5", "m6")), "latent_rows": count(),
        "latent_gamma": number(maximum=1, above=0), "write_block": count(), "inject_block": count(),
        "turn_tokens": count(), "question_tokens": count(), "latent_answer_tokens": count(),
        "n_train_questions": count(), "n_valid_questions": count(), "n_test_questions": count(),
        "learning_rate": number(above=0), "weight_decay": number(0), "grad_clip": number(above=0),
        "train_batch_size": count(), "max_steps": count(), "eval_every": count(), "patience": count(),
        "warmup_steps": integer(0), "max_turns": integer(0),
    },
}


# Relations between parameters of one chapter: (names, test, what must be true).
_RELATIONS = {
    "03": [(("ppl_stride", "ppl_window"), lambda stride, window: stride <= window, "ppl_stride <= ppl_window"),
           (("n_repetition_probes", "n_long_probes"), lambda repeated, probes: repeated <= probes,
            "n_repetition_probes <= n_long_probes"),
           (("n_long_probes", "long_seeds"), lambda probes, seeds: probes >= len(seeds),
            "at least one probe per essay seed (n_long_probes >= len(long_seeds))"),
           (("n_noise_probes", "n_long_probes", "long_seeds"),
            lambda noise, probes, seeds: noise <= -(-probes // len(seeds)),
            "n_noise_probes at most the probes of the first essay seed"),
           (("dev_tokens", "ppl_window"), lambda tokens, window: tokens >= 2 * window,
            "dev_tokens >= 2 * ppl_window (the rule compares two halves of the development windows)")],
    "04": [(("primary_gamma", "gammas"), lambda primary, gammas: primary in gammas, "primary_gamma is one of gammas"),
           (("capacities",), lambda capacities: set(capacities) <= {"1x", "10x"},
            "capacities are named 1x and/or 10x (the paper's names)"),
           (("designs", "write_blocks"), lambda designs, blocks: set(designs) <= set(blocks),
            "every design in designs has its write block in write_blocks")],
    "05": [(("ppl_tokens", "ppl_window"), lambda tokens, window: tokens >= window,
            "ppl_tokens >= ppl_window (at least one perplexity window)")],
}


def chapter_rules(chapter: str) -> dict[str, Rule]:
    """The declared parameters of chapter ``chapter`` ("01".."05"), empty for a notebook of one's own (all chapters)."""
    return CHAPTER_RULES.get(chapter, {})


def check_parameters(chapter: str, values: dict) -> None:
    """Check a chapter's parameter values; the first bad one ends with one line (all chapters).

    ``values`` is the notebook's ``globals()`` or a mapping of every parameter to its value.
    """
    for name, rule in chapter_rules(chapter).items():
        if name not in values:
            raise ParameterError(f"parameter {name} is missing")
        rule.check(name, values[name])
    for names, test, allowed in _RELATIONS.get(chapter, []):
        if not test(*(values[n] for n in names)):
            shown = ", ".join(f"{n} = {values[n]!r}" for n in names)
            raise ParameterError(f"parameters {shown} are not allowed: {allowed}")


def parameters_cell_values(source: str) -> dict:
    """Names and literal values assigned in a parameters cell's source (all chapters)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def check_names(given: dict, known: dict, where: str) -> None:
    """End with one line if ``given`` names a parameter that is not in ``known``, with the closest name (all chapters)."""
    unknown = [name for name in given if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise ParameterError(f"unknown parameter{'s' if len(unknown) > 1 else ''} for {where}: {', '.join(hints)}")
