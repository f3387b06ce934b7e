"""The one-shot binding memory of seed 000: keys, values, retrieval and injection (chapter 2).

Write: the key is the hidden state at the last token of the invented word in the write statement,
at a chosen block; the value is chapter 1's correction at the statement's answer position.
Read: the question's key retrieves the top-1 stored key by cosine similarity (one matrix
product); the retrieved value is added to the state entering the output head at the answer
position, and the model then generates greedily. The model's weights are never touched.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import tasks
from . import value as fv
from .errors import ParameterError
from .evaluation import first_word
from .models import ModelInfo, model_info, transformer_blocks
from .persistence import load_memory, save_memory

MEMORY_KIND = "binding"
MODES = ("both_top1", "context_gate", "raw_both_top1", "average", "dual_key", "dual_key_weighted")
VALUE_KINDS = ("iterated", "single_step")


@dataclass
class PromptStates:
    """Hidden states at key tokens (``keys[name][block]``, one row per prompt) and answer states (chapter 2)."""

    keys: dict[str, dict[int, torch.Tensor]]
    answer: fv.AnswerStates
    prefill: list[tuple[dict, object]] = field(default_factory=list)


def key_prefix(prompt: str, anchor: str | None = None) -> str:
    """The text whose last token holds a key: the prompt up to the end of ``anchor`` (chapter 2).

    ``anchor`` is the invented word for symbol keys, the context phrase for context keys. When it
    is None or absent (a question without that cue), the prompt up to its first question mark.
    """
    if anchor is not None and anchor in prompt:
        end = prompt.index(anchor) + len(anchor)
        return prompt[:end]
    return prompt.split("?")[0] if "?" in prompt else prompt


@torch.no_grad()
def prompt_states(model: nn.Module, tokenizer, prompts: list[str], prefixes: dict[str, list[str]],
                  layers: list[int], batch_size: int = 64, progress: bool = False,
                  keep_cache: bool = False) -> PromptStates:
    """One batched forward pass per chunk: block outputs at each prefix's last token, and answer states.

    ``prefixes`` maps a key name ("symbol", "context") to one prefix per prompt; ``layers`` index
    the blocks (0 = first block's output). A prefix must tokenise as a prefix of its prompt, which
    holds for the templates here; a mismatch raises rather than guessing (chapter 2).
    With ``keep_cache`` the prompts' key-value caches are kept, so that :func:`generate` can
    continue from them under any injection without running the prompts again: the injection
    changes only the head input at the answer position, which no cached key or value depends on.
    """
    keys = {name: {layer: [] for layer in layers} for name in prefixes}
    answers, prefill = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="forward passes", disable=not progress):
        chunk = prompts[start:start + batch_size]
        batch = fv.encode_prompts(model, tokenizer, chunk)
        out, answer = fv.forward_with_answer_states(model, batch, output_hidden_states=True, use_cache=keep_cache)
        answers.append(answer)
        if keep_cache:
            prefill.append((batch, out.past_key_values))
        width = batch["input_ids"].shape[1]
        rows = torch.arange(len(chunk))
        for name, texts in prefixes.items():
            positions = []
            for prompt, prefix in zip(chunk, texts[start:start + batch_size]):
                full, head = tokenizer.encode(prompt), tokenizer.encode(prefix)
                if full[: len(head)] != head:
                    raise ParameterError(f"key prefix {prefix!r} does not tokenise as a prefix of {prompt!r}")
                positions.append(width - len(full) + len(head) - 1)
            for layer in layers:
                keys[name][layer].append(out.hidden_states[layer + 1][rows, torch.tensor(positions)])
    return PromptStates({name: {layer: torch.cat(parts) for layer, parts in per_layer.items()}
                         for name, per_layer in keys.items()}, fv.concat_states(answers), prefill)


class KeyProjector(nn.Module):
    """A linear map from hidden states to retrieval keys, trained by backprop on cached states (chapter 2)."""

    def __init__(self, width: int, key_dim: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(width, key_dim, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(key_dim, width, generator=generator) / width ** 0.5)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        centred = states / states.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return nn.functional.normalize(self.linear(centred * self.scale), dim=-1)


def train_projector(queries: torch.Tensor, stored: torch.Tensor, key_dim: int = 128, steps: int = 300,
                    lr: float = 3e-3, temperature: float = 0.05, seed: int = 0) -> KeyProjector:
    """Contrastive (InfoNCE) training: query i must retrieve stored key i among all others (chapter 2).

    ``queries`` and ``stored`` are cached frozen hidden states of TRAINING bindings only: row i of
    each is the same (word, context). The same word in the other context is among the negatives,
    which is what teaches the projector to keep conflicting contexts apart. The LM stays frozen.
    """
    torch.manual_seed(seed)
    projector = KeyProjector(queries.shape[1], key_dim, seed)
    optimiser = torch.optim.Adam(projector.parameters(), lr=lr)
    targets = torch.arange(len(queries))
    for _ in range(steps):
        logits = projector(queries) @ projector(stored).T / temperature
        loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    projector.requires_grad_(False)
    return projector


@dataclass
class BindingMemory:
    """Stored bindings: raw key states, context states and values, with what they were written from (chapter 2).

    Keys are kept raw; each mode maps them (a learned projector, or nothing) at retrieval time.
    :func:`write_memory` also records the block the keys were read at, the value kind and the
    model, which :meth:`save` writes to a memory file and :meth:`load` checks.
    """

    symbol_states: torch.Tensor
    context_states: torch.Tensor
    values: torch.Tensor
    bindings: list[tasks.Binding] = field(default_factory=list)
    layer: int | None = None
    value_kind: str | None = None
    model: ModelInfo | None = None

    def __len__(self) -> int:
        return len(self.bindings)

    @classmethod
    def empty(cls, width: int) -> "BindingMemory":
        return cls(torch.zeros(0, width), torch.zeros(0, width), torch.zeros(0, width), [])

    def save(self, path: Path | str) -> Path:
        """Write the memory to a memory file, bit-exact and with its model (chapter 2)."""
        if self.model is None:
            raise ParameterError("BindingMemory.save: this memory does not record its model (write_memory records it): "
                                 "set memory.model = fastmem.models.model_info(model) first")
        tensors = {"symbol_states": self.symbol_states, "context_states": self.context_states, "values": self.values}
        settings = {"bindings": [asdict(b) for b in self.bindings], "layer": self.layer, "value_kind": self.value_kind}
        return save_memory(path, MEMORY_KIND, tensors, settings, self.model)

    @classmethod
    def load(cls, path: Path | str, model: nn.Module) -> "BindingMemory":
        """The memory saved by :meth:`save`, checked to belong to ``model`` (chapter 2)."""
        return load_memory(path, MEMORY_KIND, model).rebuild(lambda stored: cls(
            stored.tensors["symbol_states"], stored.tensors["context_states"], stored.tensors["values"],
            [tasks.Binding(**b) for b in stored.settings["bindings"]], stored.settings["layer"],
            stored.settings["value_kind"], model_info(model)))


def retrieve(queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 cosine retrieval for every query as one matrix product (chapter 2).

    ``allowed`` (queries x entries, bool) restricts each query to some entries (the oracle
    context gate). Returns the index and the similarity of the best entry per query.
    """
    similarity = nn.functional.normalize(queries, dim=-1) @ nn.functional.normalize(keys, dim=-1).T
    if allowed is not None:
        similarity = similarity.masked_fill(~allowed, -torch.inf)
    best, index = similarity.max(dim=-1)
    return index, best


def memory_values(model: nn.Module, answer: fv.AnswerStates, targets: torch.Tensor, kind: str,
                  step: float, n_steps: int) -> torch.Tensor:
    """The stored value: chapter 1's iterated value, or the seed's single step (chapter 2)."""
    if kind == "iterated":
        return fv.iterated_value(model, answer.head_input, targets, step, n_steps)
    if kind == "single_step":
        return fv.memory_value(model, answer.head_input, targets)
    raise ParameterError(f"unknown value kind {kind!r}: use one of {VALUE_KINDS}")


def write_memory(model: nn.Module, tokenizer, write: PromptStates, bindings: list[tasks.Binding], layer: int,
                 value_kind: str = "iterated", step: float = 4.0, n_steps: int = 5) -> BindingMemory:
    """Write every binding from its write statement's states (chapter 2); no gradient, no weight change."""
    targets = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in bindings]))
    values = memory_values(model, write.answer, targets, value_kind, step, n_steps)
    return BindingMemory(write.keys["symbol"][layer], write.keys["context"][layer], values, list(bindings),
                         layer, value_kind, model_info(model))


@torch.no_grad()
def select_values(memory: BindingMemory, mode: str, query: PromptStates, layer: int,
                  projector: KeyProjector | None = None, query_contexts: list[str] | None = None,
                  threshold: float | None = None, weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The value each query receives under ``mode``, and the entry retrieved (-1: nothing) (chapter 2).

    ``both_top1``: learned keys, all contexts in one memory. ``context_gate``: the oracle restricts
    each query to its own context's entries (needs ``query_contexts``). ``raw_both_top1``: raw
    hidden states as keys. ``average``: the retrieved word's values averaged over its contexts.
    ``dual_key``: learned symbol similarity times raw context similarity; ``dual_key_weighted``:
    ``weight * symbol + (1 - weight) * context``. Below ``threshold`` nothing is injected.
    """
    if mode not in MODES:
        raise ParameterError(f"unknown memory mode {mode!r}: use one of {MODES}")
    symbol = query.keys["symbol"][layer]
    n, width = len(symbol), memory.values.shape[1]
    if len(memory) == 0:
        return torch.zeros(n, width), torch.full((n,), -1)
    if mode != "raw_both_top1" and projector is None:
        raise ParameterError(f"mode {mode!r} needs the learned key projector")
    keys, queries = ((memory.symbol_states, symbol) if mode == "raw_both_top1"
                     else (projector(memory.symbol_states), projector(symbol)))
    allowed = None
    if mode == "context_gate":
        if query_contexts is None:
            raise ParameterError("context_gate needs the query contexts (it is an oracle)")
        stored = [b.context for b in memory.bindings]
        allowed = torch.tensor([[c == s for s in stored] for c in query_contexts])
    if mode.startswith("dual_key"):
        symbol_sim = queries @ keys.T
        context_sim = (nn.functional.normalize(query.keys["context"][layer], dim=-1)
                       @ nn.functional.normalize(memory.context_states, dim=-1).T)
        score = (symbol_sim.clamp(min=0) * context_sim.clamp(min=0) if mode == "dual_key"
                 else weight * symbol_sim + (1 - weight) * context_sim)
        best, index = score.max(dim=-1)
    else:
        index, best = retrieve(queries, keys, allowed)
    values = memory.values[index].clone()
    if mode == "average":
        words = [b.word for b in memory.bindings]
        for row, entry in enumerate(index.tolist()):
            same = [i for i, w in enumerate(words) if w == words[entry]]
            values[row] = memory.values[same].mean(dim=0)
    if threshold is not None:
        miss = best < threshold
        values[miss] = 0
        index = index.masked_fill(miss, -1)
    return values, index


def encode_bindings(model: nn.Module, tokenizer, bindings: list[tasks.Binding], layers: list[int],
                    templates: tasks.Templates = tasks.Templates(), kinds=("write", "read", "plain"),
                    keep_cache: bool = True) -> dict[str, PromptStates]:
    """States of each binding's write statement, read question and contextless question (chapter 2)."""
    prompt_of = {"write": tasks.write_prompt, "read": tasks.read_prompt, "plain": tasks.plain_prompt}
    states = {}
    for kind in kinds:
        prompts = [prompt_of[kind](b, templates) for b in bindings]
        prefixes = {"symbol": [key_prefix(p, b.word) for p, b in zip(prompts, bindings)],
                    "context": [key_prefix(p, b.context) for p, b in zip(prompts, bindings)]}
        states[kind] = prompt_states(model, tokenizer, prompts, prefixes, layers, keep_cache=keep_cache)
    return states


def encode_unrelated(model: nn.Module, tokenizer, prompts: list[str], layers: list[int]) -> PromptStates:
    """States of prompts that name no invented word; their keys sit before the question mark (chapter 2)."""
    prefixes = [key_prefix(p) for p in prompts]
    return prompt_states(model, tokenizer, prompts, {"symbol": prefixes, "context": prefixes}, layers, keep_cache=True)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, states: PromptStates, injections: torch.Tensor | None = None,
             max_new_tokens: int = 3) -> list[str]:
    """Greedy continuations of prompts prefilled by :func:`prompt_states` with ``keep_cache``.

    ``injections[i]`` is added to the head input at prompt i's answer position, the forward pass
    that produces the first generated token; later tokens are generated plainly. Without
    injections this is plain greedy decoding (chapter 2).
    """
    if not states.prefill:
        raise ParameterError("generate needs prompt states computed with keep_cache=True")
    head_input = states.answer.head_input
    if injections is not None:
        head_input = head_input + injections
    first_tokens = fv.head_logits(model, head_input).argmax(dim=-1)
    texts, start = [], 0
    for batch, past in states.prefill:
        rows = len(batch["input_ids"])
        prompt_length = past.get_seq_length()
        tokens = [first_tokens[start:start + rows]]
        mask, positions = batch["attention_mask"], batch["position_ids"][:, -1:]
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=past, use_cache=True)
            finished = torch.stack(tokens).eq(tokenizer.eos_token_id).any(dim=0)
            tokens.append(out.logits[:, -1].argmax(dim=-1).masked_fill(finished, tokenizer.eos_token_id))
        added = past.get_seq_length() - prompt_length
        if added:
            past.crop(-added)
        texts.extend(tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True))
        start += rows
    return texts


def exact_match(generations: list[str], labels: list[str]) -> torch.Tensor:
    """1.0 where the first generated word is the label, else 0.0 (chapter 2)."""
    return torch.tensor([float(first_word(g) == label.lower()) for g, label in zip(generations, labels)])


def contains_any(generations: list[str], label_sets: list[set[str]]) -> torch.Tensor:
    """1.0 where the first generated word is any of the stored labels: a false recall (chapter 2)."""
    return torch.tensor([float(first_word(g) in {l.lower() for l in labels}) for g, labels in zip(generations, label_sets)])


def score_columns(model: nn.Module, tokenizer, memory: BindingMemory, mode: str, states: dict[str, PromptStates],
                  unrelated: PromptStates, bindings: list[tasks.Binding], layer: int, projector: KeyProjector | None,
                  alpha: float = 1.0, threshold: float | None = None, weight: float = 0.5,
                  max_new_tokens: int = 3, unrelated_plain: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-prompt scores of the seed's columns for one mode (chapter 2).

    ``write``/``read``: the first generated word is the label (write statement / question).
    ``plain``: the contextless question answers with one of the word's stored labels (a false recall).
    ``unrelated``: a prompt naming no invented word answers with the retrieved entry's label.
    ``write_token``/``read_token``: the first generated token is the label's token, whatever follows
    (the first word can still miss: " cow" + "boy").
    ``unrelated_changed``: its first word differs from the model's without memory (editing's locality);
    pass the memory-free generations as ``unrelated_plain`` to avoid recomputing them for every mode.
    """
    contexts = [b.context for b in bindings]
    labels_of_word: dict[str, set[str]] = {}
    for b in memory.bindings:
        labels_of_word.setdefault(b.word, set()).add(b.label)
    targets = torch.tensor(tasks.label_token_ids(tokenizer, [b.label for b in bindings]))
    scores = {}
    for column in ("write", "read", "plain"):
        values, _ = select_values(memory, mode, states[column], layer, projector, contexts, threshold, weight)
        texts = generate(model, tokenizer, states[column], alpha * values, max_new_tokens)
        scores[column] = (exact_match(texts, [b.label for b in bindings]) if column != "plain"
                          else contains_any(texts, [labels_of_word.get(b.word, set()) for b in bindings]))
        if column != "plain":
            first = fv.head_logits(model, states[column].answer.head_input + alpha * values).argmax(dim=-1)
            scores[f"{column}_token"] = (first == targets).float()
    values, index = select_values(memory, mode if mode != "context_gate" else "both_top1", unrelated, layer,
                                  projector, None, threshold, weight)
    texts = generate(model, tokenizer, unrelated, alpha * values, max_new_tokens)
    plain_texts = unrelated_plain or generate(model, tokenizer, unrelated, None, max_new_tokens)
    retrieved = [{memory.bindings[i].label} if i >= 0 else set() for i in index.tolist()]
    scores["unrelated"] = contains_any(texts, retrieved)
    scores["unrelated_changed"] = torch.tensor([float(first_word(a) != first_word(b)) for a, b in zip(texts, plain_texts)])
    return scores


def in_context_prompts(bindings: list[tasks.Binding], all_bindings: list[tasks.Binding],
                       templates: tasks.Templates = tasks.Templates()) -> list[str]:
    """The in-context baseline: every write statement about the word, then the question (chapter 2)."""
    statements: dict[str, list[str]] = {}
    for b in all_bindings:
        statements.setdefault(b.word, []).append(templates.write.format(word=b.word, context=b.context, label=b.label))
    return [". ".join(statements[b.word]) + ". " + tasks.read_prompt(b, templates) for b in bindings]


def calibrate_threshold(projector: KeyProjector, memory: BindingMemory, read: PromptStates, plain: PromptStates,
                        unrelated: PromptStates, layer: int) -> float:
    """The similarity threshold that best separates read questions from plain and unrelated ones.

    Fitted on TRAINING bindings only: maximises (reads accepted) - (plain or unrelated accepted) (chapter 2).
    """
    keys = projector(memory.symbol_states)
    best = {name: (projector(s.keys["symbol"][layer]) @ keys.T).max(dim=-1).values
            for name, s in (("read", read), ("plain", plain), ("unrelated", unrelated))}
    candidates = torch.linspace(-1, 1, 401)
    accept = lambda sims: (sims[None, :] >= candidates[:, None]).float().mean(dim=1)
    margin = accept(best["read"]) - torch.maximum(accept(best["plain"]), accept(best["unrelated"]))
    return candidates[int(margin.argmax())].item()


def fit_dual_weight(projector: KeyProjector, memory: BindingMemory, read: PromptStates, layer: int,
                    grid: int = 21) -> float:
    """The symbol-vs-context weight of ``dual_key_weighted`` with the best retrieval on training bindings (chapter 2)."""
    truth = torch.arange(len(memory))
    accuracy = []
    for weight in torch.linspace(0, 1, grid).tolist():
        _, index = select_values(memory, "dual_key_weighted", read, layer, projector, weight=weight)
        accuracy.append(((index == truth).float().mean().item(), weight))
    return max(accuracy)[1]


@contextlib.contextmanager
def attached(model: nn.Module, memory: BindingMemory, projector: KeyProjector | None, layer: int,
             key_position: int, alpha: float = 1.0):
    """Serve the memory inside the model's own forward pass, as a deployed memory would (chapter 2).

    On the prompt's forward pass a hook on block ``layer`` reads the key at ``key_position``, one
    matrix product retrieves the top-1 entry, and a hook on the head adds ``alpha`` times its value
    at the answer position. Later (one-token) passes are left alone. Weights are never touched.
    """
    if len(memory) == 0:
        yield
        return
    keys = nn.functional.normalize(memory.symbol_states if projector is None else projector(memory.symbol_states), dim=-1)
    pending: dict[str, torch.Tensor] = {}

    def read_key(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > 1:
            query = hidden[:, key_position]
            query = query if projector is None else projector(query)
            pending["value"] = memory.values[(nn.functional.normalize(query, dim=-1) @ keys.T).argmax(dim=-1)]

    def inject(module, args):
        if "value" not in pending:
            return None
        hidden = args[0].clone()
        hidden[:, -1] += alpha * pending.pop("value")
        return (hidden, *args[1:])

    handles = [transformer_blocks(model)[layer].register_forward_hook(read_key),
               model.get_output_embeddings().register_forward_pre_hook(inject)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
