"""A minimal benchmark suite for any inference-time memory (chapter 3, "What minimal benchmark?").

Seed 001 asks what minimal benchmark would show that an inference-time memory is not just
overfitting to perplexity. Chapter 3's answer is :func:`run_suite`: one call that scores a memory
against the plain frozen model on five axes, every one paired item by item so that a confidence
interval comes with each change:

- perplexity on held-out text with the standard sliding window (:func:`perplexity`);
- compute overhead, timed side by side (:func:`overhead`);
- long generation: repetition (:func:`fastmem.evaluation.repeated_ngram_rate`,
  :func:`fastmem.evaluation.distinct_n`), drift from the prompt's topic (:class:`TopicScorer`) and a
  long-range recall probe (:func:`long_generation_probe`, probes from
  :func:`fastmem.data.load_recall_probes`);
- short comprehension: LoCoMo questions with their evidence turns in the prompt, token F1
  (:func:`fastmem.data.locomo_items`, :func:`comprehension`).

A *memory* is anything with ``attach()`` / ``detach()`` (and ``reset()``, called before every
independent episode), or a context manager; ``None`` is the plain model. A memory that keeps one
state per batch row takes ``reset(n_streams=B)``; the recall questions of the long-generation probe
are asked from the state the memory reached after the essay (``reset`` is not called in between).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import stats
from .data import RecallProbe
from .errors import ParameterError
from .evaluation import distinct_n, locomo_f1, normalise_answer, repeated_ngram_rate
from .generation import chat, generate, left_padded
from .models import transformer_blocks
from .report import estimate_text, number_text

# Politis and White's block-length rule (arch.bootstrap.optimal_block_length) fails below 8 observations.
MIN_WINDOWS_FOR_BLOCK_LENGTH = 8


# ---------------------------------------------------------------------------- memory protocol
@contextlib.contextmanager
def memory_attached(memory):
    """Attach ``memory`` for the duration of a ``with`` block (``None``: the plain model; chapter 3)."""
    if memory is None:
        yield None
    elif hasattr(memory, "attach") and hasattr(memory, "detach"):
        memory.attach()
        try:
            yield memory
        finally:
            memory.detach()
    elif hasattr(memory, "__enter__"):
        with memory as entered:
            yield entered
    else:
        raise ParameterError(f"{type(memory).__name__}: a memory needs attach()/detach() or to be a context manager")


def reset_memory(memory, n_streams: int = 1) -> None:
    """Start a new episode: ``memory.reset(n_streams=...)`` where supported, else ``memory.reset()`` (chapter 3)."""
    if memory is None or not hasattr(memory, "reset"):
        return
    if "n_streams" in inspect.signature(memory.reset).parameters:
        memory.reset(n_streams=n_streams)
    elif n_streams == 1:
        memory.reset()
    else:
        raise ParameterError(f"{type(memory).__name__}.reset() keeps one state; use batch_size=1")


# ---------------------------------------------------------------------------- perplexity
def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The standard sliding-window evaluation (as in the transformers perplexity guide): windows
    ``[begin, end)`` of at most ``window`` tokens every ``stride`` tokens; each scores only its last
    ``end - previous_end`` tokens, so every token after the first is scored exactly once (chapter 3)."""
    if window < 2 or stride < 1 or stride > window:
        raise ParameterError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    spans, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = end - previous_end
        if end - begin >= 2:
            spans.append((begin, end, min(scored, end - begin - 1)))
        previous_end = end
        if end == n_tokens:
            break
    return spans


def _window_batches(spans, batch_size: int) -> list[list[int]]:
    """Indices of ``spans`` in text order, ``batch_size`` at a time, each batch of one window length."""
    batches, current = [], []
    for i, span in enumerate(spans):
        if current and (len(current) == batch_size or span[1] - span[0] != spans[current[0]][1] - spans[current[0]][0]):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    return batches


def _score_windows(logits, inputs, batch, spans, nll, counts) -> None:
    """Write the summed loss and the count of the scored tokens of each window of ``batch``."""
    log_p = torch.log_softmax(logits.float()[:, :-1], dim=-1).gather(-1, inputs[:, 1:, None]).squeeze(-1)
    for row, i in enumerate(batch):
        scored = spans[i][2]
        nll[i] = -log_p[row, -scored:].sum().item()
        counts[i] = scored


def _perplexity_result(nll: np.ndarray, counts: np.ndarray) -> dict:
    return {"ppl": math.exp(nll.sum() / counts.sum()), "nll": nll, "tokens": counts}


@torch.no_grad()
def perplexity(model, token_ids, window: int = 512, stride: int = 256, batch_size: int = 1,
               memory=None, progress: bool = True, desc: str = "perplexity") -> dict:
    """Sliding-window perplexity of a 1-D tensor of token ids (chapter 3, measurement 1).

    Windows of equal length are batched ``batch_size`` at a time, in text order; a memory sees
    them as consecutive forward passes (it is reset once, at the start). Returns ``ppl``, and per
    window the summed negative log-likelihood ``nll`` and the number of scored tokens ``tokens``,
    so that a change can be bootstrapped over windows.
    """
    ids = torch.as_tensor(token_ids).reshape(-1)
    spans = sliding_windows(len(ids), window, stride)
    nll, counts = np.zeros(len(spans)), np.zeros(len(spans), dtype=int)
    reset_memory(memory)
    with memory_attached(memory):
        for batch in tqdm(_window_batches(spans, batch_size), desc=desc, disable=not progress, leave=False):
            inputs = torch.stack([ids[spans[i][0]:spans[i][1]] for i in batch])
            _score_windows(model(inputs).logits, inputs, batch, spans, nll, counts)
    return _perplexity_result(nll, counts)


@contextlib.contextmanager
def blocks_from(model, first_block: int):
    """Within the block, the model runs only its blocks ``first_block, first_block + 1, ...``
    (chapter 3): fed ``inputs_embeds`` = the hidden states entering ``first_block``, it returns
    what the whole model returns. The blocks are the same modules, so hooks on them still fire."""
    blocks = transformer_blocks(model)
    parent, name = next((module, child_name) for module in model.modules()
                        for child_name, child in module.named_children() if child is blocks)
    setattr(parent, name, nn.ModuleList(list(blocks)[first_block:]))
    try:
        yield model
    finally:
        setattr(parent, name, blocks)


class SharedPerplexity:
    """Sliding-window perplexity of one text for the plain model and for memories hooked at or
    above one block, sharing the blocks below it (chapter 3, section 3.3).

    Below the memory's block every memory leaves the model unchanged, so the plain pass keeps the
    hidden states entering block ``first_block`` (``hidden_states[first_block]``) and each memory
    runs only the blocks from there up (:func:`blocks_from`): the same numbers as
    :func:`perplexity` (a test checks them), at about half the cost per memory. Windows are read one
    per forward pass, in text order; a memory is reset once, at the start, and carries its state
    from window to window. ``plain`` is the plain model's :func:`perplexity` result.
    """

    @torch.no_grad()
    def __init__(self, model, token_ids, window: int, stride: int, first_block: int):
        self.model, self.first_block = model, first_block
        self.ids = torch.as_tensor(token_ids).reshape(-1)
        self.spans = sliding_windows(len(self.ids), window, stride)
        nll, counts = np.zeros(len(self.spans)), np.zeros(len(self.spans), dtype=int)
        self.states = []
        for i, (begin, end, _) in enumerate(self.spans):
            inputs = self.ids[begin:end][None]
            out = model(inputs, output_hidden_states=True)
            self.states.append(out.hidden_states[first_block])
            _score_windows(out.logits, inputs, [i], self.spans, nll, counts)
        self.plain = _perplexity_result(nll, counts)

    @torch.no_grad()
    def score(self, memory) -> dict:
        """The :func:`perplexity` result with ``memory`` attached, from the kept states (chapter 3)."""
        nll, counts = np.zeros(len(self.spans)), np.zeros(len(self.spans), dtype=int)
        reset_memory(memory)
        with memory_attached(memory), blocks_from(self.model, self.first_block):
            for i, ((begin, end, _), states) in enumerate(zip(self.spans, self.states)):
                logits = self.model(inputs_embeds=states).logits
                _score_windows(logits, self.ids[begin:end][None], [i], self.spans, nll, counts)
        return _perplexity_result(nll, counts)


def perplexity_windows(result: dict, windows) -> dict:
    """The :func:`perplexity` result restricted to some of its windows (chapter 3: early against late)."""
    picks = np.asarray(windows)
    return _perplexity_result(result["nll"][picks], result["tokens"][picks])


def perplexity_change(plain: dict, other: dict, n_boot: int = 2000, seed: int = 0, *,
                      block_bootstrap: bool = False) -> dict:
    """Change of perplexity in percent with a paired bootstrap interval over windows (chapters 3 and 5).

    Without ``block_bootstrap`` windows are resampled independently. That is too narrow where a
    memory carries its state from window to window, since consecutive windows then depend on each
    other; with ``block_bootstrap`` the interval is a moving block bootstrap of the per-window
    difference of mean token loss (:func:`fastmem.stats.block_bootstrap_change`), its block length
    chosen by Politis and White's rule from the series and returned as ``block_length``. Windows
    then count equally: all but the first score the same number of tokens. The rule needs at least
    :data:`MIN_WINDOWS_FOR_BLOCK_LENGTH` windows; with fewer, the whole stream is one block and the
    interval is its single point, which the verdict rules read as no evidence.
    """
    point = 100 * (other["ppl"] / plain["ppl"] - 1)
    if block_bootstrap:
        plain_loss, other_loss = plain["nll"] / plain["tokens"], other["nll"] / other["tokens"]
        block_length = None if len(plain_loss) >= MIN_WINDOWS_FOR_BLOCK_LENGTH else len(plain_loss)
        with np.errstate(divide="ignore", invalid="ignore"):  # a memory that never acts: zero differences
            change = stats.block_bootstrap_change(plain_loss, other_loss, relative=False,
                                                  block_length=block_length, n_boot=n_boot, seed=seed)
        # the loss difference maps to the perplexity change monotonically, so its percentiles do too
        low, high = (100 * (np.exp(change[end]) - 1) for end in ("low", "high"))
        return {"change_pct": point, "low": float(low), "high": float(high),
                "block_length": change["block_length"]}

    def change(picks):
        tokens = plain["tokens"][picks].sum(1)
        return 100 * (np.exp((other["nll"][picks].sum(1) - plain["nll"][picks].sum(1)) / tokens) - 1)

    low, high = stats.paired_bootstrap(change, len(plain["nll"]), n_boot, seed)
    return {"change_pct": point, "low": low, "high": high}


def next_token_nll(log_probs: torch.Tensor, token_ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of one row ``token_ids`` (1, L) under ``log_probs`` (1, L, V) (chapter 3)."""
    return -log_probs[0, :-1].gather(-1, token_ids[0, 1:, None]).mean().item()


# ---------------------------------------------------------------------------- overhead
def timing_ratio(plain_times, memory_times, n_boot: int = 2000, seed: int = 0) -> dict:
    """Overhead in percent from paired, interleaved timings (chapter 3, measurement 2).

    Repetition ``i`` timed the plain model and then the memory back to back, so both saw the same
    machine load; its ratio ``memory_i / plain_i`` cancels slow drifts of that load. The overhead
    is ``100 (median ratio - 1)`` with a percentile bootstrap interval over repetitions
    (:func:`fastmem.stats.paired_bootstrap`); it depends on ratios only, never on absolute seconds.
    """
    plain, memory = np.asarray(plain_times, float), np.asarray(memory_times, float)
    if plain.shape != memory.shape or plain.size == 0:
        raise ParameterError("timing_ratio needs as many memory timings as plain ones, at least one")
    ratios = memory / plain
    low, high = stats.paired_bootstrap(lambda picks: 100 * (np.median(ratios[picks], axis=1) - 1),
                                       len(ratios), n_boot, seed)
    return {"overhead_pct": float(100 * (np.median(ratios) - 1)), "low": low, "high": high,
            "plain_s": float(np.median(plain)), "memory_s": float(np.median(memory)),
            "plain_times": plain.tolist(), "memory_times": memory.tolist()}


@torch.no_grad()
def overhead(model, token_ids, memory, repeats: int = 7, decode_steps: int = 16, n_boot: int = 2000,
             seed: int = 0, progress: bool = True) -> dict:
    """Wall-time overhead of ``memory`` in percent (chapter 3, measurement 2).

    Plain and memory runs alternate (plain, memory, plain, memory, ...) so that both see the same
    machine load; each run is (a) one forward pass over ``token_ids`` and (b) ``decode_steps``
    single-token steps with a KV cache (time per step). For each, :func:`timing_ratio` gives the
    median of the per-repetition ratios with a bootstrap interval over repetitions.
    """
    ids = torch.as_tensor(token_ids).reshape(1, -1)
    times = {("forward", False): [], ("forward", True): [], ("decode", False): [], ("decode", True): []}

    def one_run(with_memory: bool):
        reset_memory(memory if with_memory else None)
        context = memory_attached(memory) if with_memory else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            times[("forward", with_memory)].append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(decode_steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times[("decode", with_memory)].append((time.perf_counter() - start) / max(decode_steps, 1))

    one_run(False)  # warm-up, not kept
    one_run(True)
    for key in times:
        times[key].clear()
    for _ in tqdm(range(repeats), desc="overhead", disable=not progress, leave=False):
        one_run(False)
        one_run(True)
    return {kind: timing_ratio(times[(kind, False)], times[(kind, True)], n_boot, seed)
            for kind in ("forward", "decode")}


# ---------------------------------------------------------------------------- drift
class TopicScorer:
    """Topic similarity of texts: cosine of mean-pooled hidden states of the plain model at one
    layer, centred on the mean state of reference text (without centring, any two pooled states
    have cosine near 0.9 and every text looks on-topic). Chapter 3, "drift"."""

    def __init__(self, model, tokenizer, reference_texts: list[str], layer: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.layer = len(transformer_blocks(model)) // 2 if layer is None else layer
        self.centre = torch.zeros(0)
        self.centre = torch.stack([self.embed(t) for t in reference_texts]).mean(0)

    @torch.no_grad()
    def embed(self, text_or_ids) -> torch.Tensor:
        """Mean hidden state of a text (or token ids) at the scorer's layer, centred (chapter 3)."""
        ids = self.tokenizer(text_or_ids, return_tensors="pt").input_ids if isinstance(text_or_ids, str) \
            else torch.as_tensor(text_or_ids).reshape(1, -1)
        states = self.model(ids, output_hidden_states=True).hidden_states[self.layer]
        pooled = states[0].float().mean(0)
        return pooled - self.centre if self.centre.numel() else pooled

    def curve(self, topic: str, token_ids, chunk: int = 100) -> list[float]:
        """Topic similarity of each ``chunk``-token piece of a generation, in order (chapter 3)."""
        ids = list(token_ids)
        topic_vector = self.embed(topic)
        return [torch.nn.functional.cosine_similarity(topic_vector, self.embed(ids[i:i + chunk]), dim=0).item()
                for i in range(0, len(ids) - chunk + 1, chunk)]


# ---------------------------------------------------------------------------- generation
def generate_with_memory(model, tokenizer, prompts: list[str], max_new_tokens: int, memory=None, *,
                         keep_state: bool = False, **options) -> list[list[int]]:
    """:func:`fastmem.generation.generate` with ``memory`` attached, one state per prompt (chapter 3).

    The memory is reset with ``n_streams=len(prompts)`` unless ``keep_state``; ``options`` are
    those of :func:`fastmem.generation.generate` (sampling is seeded there, after the memory is
    attached, so plain and memory runs draw the same random numbers).
    """
    if not keep_state:
        reset_memory(memory, n_streams=len(prompts))
    with memory_attached(memory):
        return generate(model, tokenizer, prompts, max_new_tokens, **options)


# ---------------------------------------------------------------------------- long-generation probe
def _probe_request(probe: RecallProbe) -> str:
    return f"Remember these facts: {probe.facts} Now write a long, detailed essay about {probe.topic}."


def probe_prompt(tokenizer, probe: RecallProbe) -> str:
    """The long-generation prompt: the facts, then the essay request (chapter 3)."""
    return chat(tokenizer, [("user", _probe_request(probe))])


def _contains(answer_text: str, gold: str) -> float:
    """1 if every word of ``gold`` is a word of the answer ("red" is not found in "considered")."""
    return float(set(normalise_answer(gold)) <= set(normalise_answer(answer_text)))


@torch.no_grad()
def long_generation_probe(model, tokenizer, probes, memory=None, n_tokens: int = 500, *, topic_scorer=None,
                          chunk: int = 100, ngram: int = 4, seed: int = 0, answer_tokens: int = 40,
                          batch_size: int = 4, progress: bool = True) -> dict:
    """Long generation with facts stated first, then recall questions (chapter 3, measurement 3).

    Each probe's prompt states three facts and asks for a long essay; ``n_tokens`` tokens are
    sampled (seeded, no early stop). Then the three questions are asked together in a new user
    turn after the essay, from the state the memory reached, and each fact scores 1 if its gold
    word is a word of the greedy answer (``answer_tokens = 0``: no questions, for repetition and
    drift alone; chapter 3 scores recall with :func:`teacher_forced_recall`). Returns per probe the repeated n-gram rate, distinct-2, topic
    similarity per chunk and the share of its facts recalled (``recall_per_probe``: the facts of one
    essay are not independent, so intervals resample probes), and per fact the recall.
    """
    rows = {"repeat": [], "distinct2": [], "topic_curve": [], "drift": [], "recall": [], "recall_per_probe": [],
            "texts": [], "answers": []}
    probes = list(probes)
    for start in tqdm(range(0, len(probes), batch_size), desc="long generation", disable=not progress, leave=False):
        group = probes[start:start + batch_size]
        prompts = [probe_prompt(tokenizer, p) for p in group]
        essays = generate_with_memory(model, tokenizer, prompts, n_tokens, memory, sample=True, seed=seed + start,
                                      min_new_tokens=n_tokens)
        for probe, essay in zip(group, essays):
            rows["repeat"].append(repeated_ngram_rate(essay, ngram))
            rows["distinct2"].append(distinct_n(essay, 2))
            rows["texts"].append(tokenizer.decode(essay))
            if topic_scorer is not None:
                curve = topic_scorer.curve(probe.topic, essay, chunk)
                rows["topic_curve"].append(curve)
                rows["drift"].append(curve[0] - curve[-1] if curve else float("nan"))
        if answer_tokens == 0:
            continue
        recall_prompts = []
        for probe, essay in zip(group, essays):
            questions = " ".join(question for question, _ in probe.questions)
            recall_prompts.append(chat(tokenizer, [
                ("user", _probe_request(probe)), ("assistant", tokenizer.decode(essay, skip_special_tokens=True)),
                ("user", f"Answer from the facts I gave you at the start. {questions}")]))
        answers = generate_with_memory(model, tokenizer, recall_prompts, answer_tokens, memory,
                                       keep_state=memory is not None)
        for probe, answer in zip(group, answers):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            rows["answers"].append(text)
            recalled = [_contains(text, gold) for _, gold in probe.questions]
            rows["recall"].extend(recalled)
            rows["recall_per_probe"].append(float(np.mean(recalled)))
    return rows


# ---------------------------------------------------------------------------- teacher-forced recall
RECALL_INSTRUCTION = "Answer in one word, from the facts I gave you at the start."


def plain_essays(model, tokenizer, probes, n_tokens: int, seed: int, batch_size: int = 4) -> list[list[int]]:
    """One sampled essay per probe from the plain model, ``n_tokens`` long (chapter 3, section 3.3).

    The essays are shared by every condition of :func:`teacher_forced_recall`, so that recall with
    and without a memory is scored in the same text.
    """
    probes = list(probes)
    essays = []
    for start in range(0, len(probes), batch_size):
        prompts = [probe_prompt(tokenizer, p) for p in probes[start:start + batch_size]]
        essays += generate(model, tokenizer, prompts, n_tokens, sample=True, seed=seed + start, min_new_tokens=n_tokens)
    return essays


def recall_sequence(tokenizer, probe: RecallProbe, essay: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of probe, essay and every question answered with its gold word, and where each answer
    lies (``[start, end)``), for teacher-forced scoring (chapter 3, section 3.3).

    One chat: the facts and essay request, the essay as the assistant's turn, then per fact a user
    turn with the question and an assistant turn with the gold answer. Facts are independent, so
    a later question sees earlier gold answers but never its own.
    """
    turns = [("user", _probe_request(probe)), ("assistant", tokenizer.decode(essay, skip_special_tokens=True))]
    spans = []
    for question, answer in probe.questions:
        turns.append(("user", f"{RECALL_INSTRUCTION} {question}"))
        start = len(tokenizer(chat(tokenizer, turns), add_special_tokens=False).input_ids)
        spans.append((start, start + len(tokenizer(answer, add_special_tokens=False).input_ids)))
        turns.append(("assistant", answer))
    ids = tokenizer(chat(tokenizer, turns, open_reply=False), add_special_tokens=False).input_ids
    for (start, end), (_, answer) in zip(spans, probe.questions):
        if tokenizer.decode(ids[start:end]).strip() != answer:
            raise ParameterError(f"the answer {answer!r} does not tokenise alone inside the chat; change the probe")
    return ids, spans


@torch.no_grad()
def teacher_forced_recall(model, tokenizer, probes, essays, memory=None, *, chunk: int = 16, batch_size: int = 8,
                          progress: bool = True) -> dict:
    """Recall of every fact scored teacher-forced after a given essay (chapter 3, section 3.3).

    Each probe's :func:`recall_sequence` is read in forward passes of ``chunk`` tokens with a KV
    cache, so a memory sees one pass per chunk (as in generation, where it sees one per token) and
    its feedback reaches every later chunk, the questions and the answers. Rows are padded on the
    right (causal attention never sees the padding) and the memory keeps one state per row.
    Per fact: ``recalled`` (1 if every gold token is the greedy choice given the tokens before it)
    and ``log_prob`` (summed log-probability of the gold tokens).
    """
    rows = [recall_sequence(tokenizer, p, e) for p, e in zip(probes, essays)]
    recalled, log_prob = np.zeros((len(rows), 3)), np.zeros((len(rows), 3))
    order = np.argsort([len(ids) for ids, _ in rows])
    for start in tqdm(range(0, len(rows), batch_size), desc="recall", disable=not progress, leave=False):
        group = order[start:start + batch_size]
        length = max(len(rows[i][0]) for i in group)
        ids = torch.full((len(group), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, :len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[r, :len(rows[i][0])] = 1
        gold_logp = torch.zeros(len(group), length)
        gold_is_greedy = torch.zeros(len(group), length, dtype=torch.bool)
        reset_memory(memory, n_streams=len(group))
        with memory_attached(memory):
            cache = None
            for begin in range(0, length - 1, chunk):
                end = min(begin + chunk, length - 1)
                out = model(input_ids=ids[:, begin:end], attention_mask=mask[:, :end], past_key_values=cache,
                            use_cache=True)
                cache = out.past_key_values
                logits = out.logits.float()
                targets = ids[:, begin + 1:end + 1, None]
                gold_logp[:, begin + 1:end + 1] = torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1)
                gold_is_greedy[:, begin + 1:end + 1] = logits.argmax(-1) == targets.squeeze(-1)
        for r, i in enumerate(group):
            for k, (a, b) in enumerate(rows[i][1]):
                recalled[i, k] = float(gold_is_greedy[r, a:b].all())
                log_prob[i, k] = float(gold_logp[r, a:b].sum())
    return {"recalled": recalled, "log_prob": log_prob}


# ---------------------------------------------------------------------------- comprehension
def comprehension_prompt(tokenizer, item: dict, with_evidence: bool = True) -> str:
    """A LoCoMo item (:func:`fastmem.data.locomo_items`), with or without its evidence, as a chat prompt (chapter 3)."""
    if with_evidence:
        text = f"Conversation excerpt:\n{item['evidence_text']}\n\nQuestion: {item['question']} Answer in a few words."
    else:
        text = f"Question: {item['question']} Answer in a few words."
    return chat(tokenizer, [("user", text)])


@torch.no_grad()
def comprehension(model, tokenizer, items: list[dict], memory=None, *, with_evidence: bool = True,
                  preload_evidence: bool = False, batch_size: int = 8, answer_tokens: int = 16,
                  progress: bool = True) -> dict:
    """LoCoMo scores (:func:`fastmem.evaluation.locomo_f1`) of greedy answers to ``items``, one memory state per item (chapter 3).

    ``preload_evidence``: before the question, the evidence is passed once through the model with
    the memory attached (a separate forward pass), so that only the memory can carry it to the
    question: the "memory instead of context" condition of chapter 3.
    """
    f1, answers = [], []
    for start in tqdm(range(0, len(items), batch_size), desc="comprehension", disable=not progress, leave=False):
        group = items[start:start + batch_size]
        prompts = [comprehension_prompt(tokenizer, item, with_evidence) for item in group]
        keep = False
        if preload_evidence and memory is not None:
            reset_memory(memory, n_streams=len(group))
            batch = left_padded(tokenizer, [chat(tokenizer, [("user", item["evidence_text"])]) for item in group])
            with memory_attached(memory):
                model(**batch)
            keep = True
        outputs = generate_with_memory(model, tokenizer, prompts, answer_tokens, memory, keep_state=keep)
        for item, output in zip(group, outputs):
            text = tokenizer.decode(output, skip_special_tokens=True).strip()
            answers.append(text)
            f1.append(locomo_f1(text, item["answer"], item["category"]))
    return {"f1": np.array(f1), "answers": answers}


def answer_changes(plain: dict, other: dict) -> dict:
    """How :func:`comprehension` answers moved with a memory (chapters 3, 5): the exact sign test of
    their token F1 over questions (:func:`fastmem.stats.sign_test`: ``better``, ``worse``,
    ``unchanged``, ``p_value``) and ``changed``, the number of answers whose text differs."""
    changed = sum(a != b for a, b in zip(other["answers"], plain["answers"]))
    return {**stats.sign_test(plain["f1"], other["f1"]), "changed": changed}


# ---------------------------------------------------------------------------- the suite
@dataclass
class Suite:
    """The inputs of the minimal benchmark suite (chapter 3); sizes are the caller's choice."""

    ppl_ids: torch.Tensor
    timing_ids: torch.Tensor
    probes: tuple
    items: list
    topic_scorer: TopicScorer | None = None
    window: int = 512
    stride: int = 256
    ppl_batch_size: int = 1
    overhead_repeats: int = 7
    long_tokens: int = 500
    recall_tokens: int = 40
    answer_tokens: int = 16
    chunk: int = 100
    batch_size: int = 4
    seed: int = 0
    parts: tuple = ("perplexity", "overhead", "long", "comprehension")


def run_suite(model, tokenizer, suite: Suite, memory=None, baseline: dict | None = None, parts=None,
              progress: bool = True) -> dict:
    """Score ``memory`` on the minimal suite (chapter 3); ``memory=None``: the plain model's raw results.

    Returns raw per-item results for each part; pass the plain model's result as ``baseline`` and
    use :func:`summarise` for the table of changes with confidence intervals. The plain model is
    never re-run when a baseline is given.
    """
    parts = tuple(parts or suite.parts)
    result = {"parts": parts}
    if "perplexity" in parts:
        result["perplexity"] = perplexity(model, suite.ppl_ids, suite.window, suite.stride, suite.ppl_batch_size,
                                          memory, progress, desc="perplexity" + (" (memory)" if memory else ""))
    if "overhead" in parts and memory is not None:
        result["overhead"] = overhead(model, suite.timing_ids, memory, suite.overhead_repeats, progress=progress)
    if "long" in parts:
        result["long"] = long_generation_probe(model, tokenizer, suite.probes, memory, suite.long_tokens,
                                               topic_scorer=suite.topic_scorer, chunk=suite.chunk, seed=suite.seed,
                                               answer_tokens=suite.recall_tokens, batch_size=suite.batch_size,
                                               progress=progress)
    if "comprehension" in parts:
        result["comprehension"] = comprehension(model, tokenizer, suite.items, memory, batch_size=2 * suite.batch_size,
                                                answer_tokens=suite.answer_tokens, progress=progress)
    if baseline is not None:
        result["baseline"] = baseline
    return result


def suite_cell(row) -> str:
    """One cell of chapter 3's suite table from a :func:`summarise` row: the memory's value, then its
    change against plain with the 95% interval ("0.512 (+1.20% [+0.40, +2.00])"; chapter 3)."""
    unit = "%" if row["unit"] == "% change" else ""
    return f"{number_text(row['memory'])} ({estimate_text(row['change'], row['low'], row['high'], signed=True, unit=unit)})"


def summarise(result: dict, baseline: dict | None = None, *, perplexity_blocks: bool = False) -> "pandas.DataFrame":
    """One row per metric: plain, memory, change and its 95% interval (percent where noted; chapters 3 and 5).

    ``perplexity_blocks`` gives the perplexity change a moving block bootstrap over windows (see
    :func:`perplexity_change`), the interval that fits a memory carrying state across windows.
    """
    import pandas as pd

    baseline = baseline or result.get("baseline")
    if baseline is None:
        raise ParameterError("summarise needs the plain model's result as baseline")
    rows = []
    if "perplexity" in result:
        change = perplexity_change(baseline["perplexity"], result["perplexity"], block_bootstrap=perplexity_blocks)
        rows.append({"metric": "perplexity", "unit": "% change", "plain": baseline["perplexity"]["ppl"],
                     "memory": result["perplexity"]["ppl"], "change": change["change_pct"],
                     "low": change["low"], "high": change["high"]})
    if "overhead" in result:
        for kind in ("forward", "decode"):
            o = result["overhead"][kind]
            rows.append({"metric": f"wall time, {kind}", "unit": "% change", "plain": o["plain_s"],
                         "memory": o["memory_s"], "change": o["overhead_pct"], "low": o["low"], "high": o["high"]})
    if "long" in result:
        b, r = baseline["long"], result["long"]
        specs = [("repeated 4-gram rate", "repeat", False), ("distinct-2", "distinct2", False),
                 ("topic drift (first - last chunk)", "drift", False), ("long-range recall", "recall_per_probe", True)]
        for name, key, relative in specs:
            if b[key]:
                c = stats.paired_change(b[key], r[key], relative)
                rows.append({"metric": name, "unit": "% change" if relative else "absolute change", "plain": c["plain"],
                             "memory": c["memory"], "change": c["change"], "low": c["low"], "high": c["high"]})
    if "comprehension" in result:
        c = stats.paired_change(baseline["comprehension"]["f1"], result["comprehension"]["f1"], True)
        rows.append({"metric": "comprehension token F1", "unit": "% change", "plain": c["plain"], "memory": c["memory"],
                     "change": c["change"], "low": c["low"], "high": c["high"]})
    return pd.DataFrame(rows)


__all__ = ["memory_attached", "reset_memory", "sliding_windows", "perplexity", "blocks_from", "SharedPerplexity",
           "perplexity_windows", "perplexity_change", "next_token_nll",
           "timing_ratio", "overhead",
           "TopicScorer", "generate_with_memory", "probe_prompt", "long_generation_probe", "plain_essays",
           "recall_sequence", "teacher_forced_recall", "comprehension_prompt",
           "comprehension", "answer_changes", "Suite", "run_suite", "suite_cell", "summarise"]
