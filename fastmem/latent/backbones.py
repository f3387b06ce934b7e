"""Frozen backbones around a latent-memory adapter: where reads enter, what is cached (chapter 4).

Compute is the design problem (chapter 4, "Method"): the backbone is frozen and writes carry no
gradient, so turns are encoded once, and for decoder-only models the hidden states entering
``inject_block`` are cached so that training back-propagates only through the blocks above it.
:func:`make_backbone` picks :class:`DecoderOnlyBackbone` or :class:`EncoderDecoderBackbone`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ParameterError
from ..models import final_norm, transformer_blocks
from .devices import resolve_device


class _KV:
    """Minimal key/value cache for Hugging Face attention modules (``update`` is all they call)."""

    def __init__(self, k=None, v=None):
        self.k, self.v = dict(k or {}), dict(v or {})

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx in self.k:
            key = torch.cat([self.k[layer_idx], key], dim=2)
            value = torch.cat([self.v[layer_idx], value], dim=2)
        self.k[layer_idx], self.v[layer_idx] = key, value
        return key, value

    def copy(self) -> "_KV":
        return _KV(self.k, self.v)

    def to(self, device) -> "_KV":
        return _KV({i: t.to(device) for i, t in self.k.items()}, {i: t.to(device) for i, t in self.v.items()})

    def expand(self, batch: int) -> "_KV":
        return _KV({i: t.expand(batch, -1, -1, -1) for i, t in self.k.items()},
                   {i: t.expand(batch, -1, -1, -1) for i, t in self.v.items()})


def _per_batch(tokens: torch.Tensor) -> torch.Tensor:
    """Memory tokens as ``(n, rows, width)``: a shared bank's tokens get a batch axis of 1."""
    return tokens if tokens.dim() == 3 else tokens.unsqueeze(0)


def _mask(valid: torch.Tensor, n_query: int, prefix: int, dtype) -> torch.Tensor:
    """Additive mask (B, 1, Q, prefix + S): all prefix keys visible, causal and padding over the rest."""
    b, s = valid.shape
    device = valid.device
    qpos = torch.arange(s - n_query, s, device=device).unsqueeze(1)
    allowed = valid[:, None, :] & (torch.arange(s, device=device)[None, :] <= qpos)[None]
    if prefix:
        allowed = torch.cat([torch.ones(b, n_query, prefix, dtype=torch.bool, device=device), allowed], -1)
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _padded(rows: list[list], fill, device, *, left: bool) -> torch.Tensor:
    """Rows of different lengths as one tensor on ``device``, padded with ``fill`` on the left or right."""
    width = max(map(len, rows))
    pad = [[fill] * (width - len(r)) for r in rows]
    return torch.tensor([p + r if left else r + p for p, r in zip(pad, rows)], device=device)


def _model_device(model, device) -> torch.device:
    """Resolve ``device`` and move the frozen model there (its weights are read only)."""
    device = resolve_device(device)
    model.to(device)
    return device


@dataclass
class QuestionBatch:
    """Questions ready for a backbone: token ids, masks, labels and cached frozen states (chapter 4)."""

    ids: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor | None
    labels: torch.Tensor | None
    cached: torch.Tensor | None  # decoder-only: states entering inject_block; T5: encoder output
    lower_cache: _KV | None = None
    upper_cache: _KV | None = None
    prefix_lens: dict = field(default_factory=dict)
    position_offset: int = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "QuestionBatch":
        """The same batch with every tensor and cache on ``device`` (chapter 4)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, ids=move(self.ids), valid=move(self.valid), positions=move(self.positions),
                       labels=move(self.labels), cached=move(self.cached), lower_cache=move(self.lower_cache),
                       upper_cache=move(self.upper_cache))

    def subset(self, idx) -> "QuestionBatch":
        """The rows ``idx`` of the batch, for a training mini-batch (chapter 4)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.ids.device)
        sub = replace(self, ids=self.ids[idx], valid=self.valid[idx],
                      positions=None if self.positions is None else self.positions[idx],
                      labels=None if self.labels is None else self.labels[idx],
                      cached=None if self.cached is None else self.cached[idx])
        if self.lower_cache is None and sub.positions is not None:  # drop all-padding columns (left padded)
            start = int(sub.valid.any(0).float().argmax())
            sub = replace(sub, ids=sub.ids[:, start:], valid=sub.valid[:, start:], positions=sub.positions[:, start:],
                          labels=None if sub.labels is None else sub.labels[:, start:],
                          cached=None if sub.cached is None else sub.cached[:, start:])
        return sub


class DecoderOnlyBackbone:
    """A frozen decoder-only model split at ``inject_block`` (chapter 4, "Decoder-only mapping").

    Turns are written from the states after ``write_block`` blocks. Question states entering
    ``inject_block`` are computed once and cached; the adapter reads there, and training
    back-propagates through the blocks from ``inject_block`` up only.
    """

    family = "decoder-only"

    def __init__(self, model, tokenizer, *, inject_block: int, write_block: int,
                 question_tokens: int = 24, answer_tokens: int = 8, turn_tokens: int = 24, device="auto"):
        self.model, self.tokenizer = model, tokenizer
        self.device = _model_device(model, device)
        self.blocks = transformer_blocks(model)
        n = len(self.blocks)
        for name, value in (("inject_block", inject_block), ("write_block", write_block)):
            if not isinstance(value, int) or not 0 <= value < n:
                raise ParameterError(f"{name} must be an integer block index in [0, {n - 1}], got {value!r}")
        self.inject, self.write_block = inject_block, write_block
        self.question_tokens, self.answer_tokens, self.turn_tokens = question_tokens, answer_tokens, turn_tokens
        self.embed = model.get_input_embeddings()
        self.norm, self.head = final_norm(model), model.get_output_embeddings()
        self.rotary = model.base_model.rotary_emb
        self.cache_kw = "layer_past" if hasattr(self.blocks[0], "attention") else "past_key_values"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_id = tokenizer.encode("\n", add_special_tokens=False)[-1]
        vocab = self.head.weight.shape[0]
        texts = [tokenizer.convert_tokens_to_string([t])
                 for t in tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))]
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        self.blank_ids = torch.tensor(blank + [self.stop_id] + list(tokenizer.all_special_ids), device=self.device)
        # a bare space may open an answer (" 4817" is " ", "4", ...) if text follows it at once
        self.space_ids = torch.tensor([i for i in blank if texts[i] and set(texts[i]) == {" "}], device=self.device)

    @property
    def width(self) -> int:
        """Hidden width ``d`` of the backbone (chapter 4)."""
        return self.embed.weight.shape[1]

    def to(self, device) -> "DecoderOnlyBackbone":
        """Move the frozen model and the backbone's own tensors to ``device`` (chapter 4)."""
        self.device = _model_device(self.model, device)
        self.blank_ids, self.space_ids = self.blank_ids.to(self.device), self.space_ids.to(self.device)
        return self

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run(self, h, positions, valid, layers, cache=None, prefix_lens=None, hook=None):
        prefix_lens = prefix_lens or {}
        pe = self.rotary(h, positions)
        for i in layers:
            if hook is not None and i == self.inject:
                h = h + hook(h)
            mask = _mask(valid, h.shape[1], prefix_lens.get(i, 0), h.dtype)
            kw = {self.cache_kw: cache} if cache is not None else {}
            out = self.blocks[i](h, attention_mask=mask, position_embeddings=pe, position_ids=positions, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h

    @torch.no_grad()
    def encode_turns(self, texts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Each turn's states after ``write_block`` blocks, truncated to ``turn_tokens`` (no gradient; chapter 4)."""
        out = []
        for start in range(0, len(texts), batch_size):
            rows = [self._tok(t)[: self.turn_tokens] or [self.pad_id] for t in texts[start:start + batch_size]]
            ids = _padded(rows, self.pad_id, self.device, left=False)
            valid = _padded([[True] * len(r) for r in rows], False, self.device, left=False)
            pos = torch.arange(ids.shape[1], device=self.device).expand(len(rows), -1)
            h = self._run(self.embed(ids), pos, valid, range(self.write_block))
            out += [h[i, : len(r)].clone() for i, r in enumerate(rows)]
        return out

    def prompt(self, question: str) -> list[int]:
        """Token ids of the prompt "question: <q>\\nanswer:" (chapter 4)."""
        return self._tok("question: " + question)[: self.question_tokens] + self._tok("\nanswer:")

    @torch.no_grad()
    def prepare(self, questions: list[str], answers: list[str] | None = None, *, context: str | None = None,
                context_tokens: int = 0, contexts: list[str] | None = None) -> QuestionBatch:
        """Tokenise (left padded) and cache the frozen states entering ``inject_block`` (chapter 4).

        With ``answers``: teacher-forcing rows (prompt + answer + newline) for training.
        Without: prompts for generation, with the lower blocks' key/value cache kept. ``context``
        (long-context baseline) is run once through every block and shared by all rows;
        ``contexts`` (retrieval baseline) gives each row its own text before the question.
        """
        rows, labels = [], []
        for i, q in enumerate(questions):
            p = self.prompt(q)
            if contexts is not None:
                p = self._tok(contexts[i]) + p
            # answers are stripped: a stray leading space in the data would make a target no rule generates
            a = (self._tok(" " + answers[i].strip())[: self.answer_tokens] + [self.stop_id]) if answers else []
            rows.append(p + a)
            labels.append([-100] * (len(p) - 1) + a + [-100])
        b = len(rows)
        ids = _padded(rows, self.pad_id, self.device, left=True)
        valid = _padded([[True] * len(r) for r in rows], False, self.device, left=True)
        lab = _padded([labels[i][: len(r)] for i, r in enumerate(rows)], -100, self.device, left=True)
        offset, lower_cache, upper_cache, prefix_lens = 0, None, None, {}
        if answers is None:
            lower_cache, upper_cache = _KV(), _KV()
            if context:
                cids = self._tok(context)[-context_tokens:] if context_tokens else self._tok(context)
                offset = len(cids)
                cpos = torch.arange(offset, device=self.device).unsqueeze(0)
                tmp = _KV()
                self._run(self.embed(torch.tensor([cids], device=self.device)), cpos,
                          torch.ones(1, offset, dtype=torch.bool, device=self.device), range(len(self.blocks)),
                          cache=tmp)
                full = tmp.expand(b)
                lower_cache = _KV({i: full.k[i] for i in range(self.inject)}, {i: full.v[i] for i in range(self.inject)})
                upper_cache = _KV({i: full.k[i] for i in range(self.inject, len(self.blocks))},
                                  {i: full.v[i] for i in range(self.inject, len(self.blocks))})
                prefix_lens = {i: offset for i in range(len(self.blocks))}
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) + offset
        h = self._run(self.embed(ids), positions, valid, range(self.inject), cache=lower_cache, prefix_lens=prefix_lens)
        return QuestionBatch(ids, valid, positions, lab if answers else None, h, lower_cache, upper_cache,
                             prefix_lens, offset)

    def _memory_prefix(self, adapter, bank, batch_size, cache):
        """m1: memory tokens through every block from ``inject_block`` up; m3: through that block only."""
        tokens = _per_batch(adapter.memory_tokens(bank))
        n, p = tokens.shape[:2]
        layers = range(self.inject, len(self.blocks)) if adapter.injection == "prefix" else [self.inject]
        tmp = _KV()
        self._run(tokens, torch.zeros(n, p, dtype=torch.long, device=self.device),
                  torch.ones(n, p, dtype=torch.bool, device=self.device), layers, cache=tmp)
        full = tmp.expand(batch_size)
        cache.k.update(full.k)
        cache.v.update(full.v)
        return {i: p for i in layers}

    def _upper(self, h, positions, valid, adapter, bank, cache, prefix_lens):
        hook = None
        if adapter is not None and adapter.injection == "residual":
            hook = lambda x: adapter.residual(x, bank)  # noqa: E731
        h = self._run(h, positions, valid, range(self.inject, len(self.blocks)), cache, prefix_lens, hook)
        return self.norm(h)

    def _start_upper(self, batch, adapter, bank):
        cache = batch.upper_cache.copy() if batch.upper_cache is not None else _KV()
        prefix_lens = dict(batch.prefix_lens)
        if adapter is not None and adapter.injection in ("prefix", "kv"):
            prefix_lens.update(self._memory_prefix(adapter, bank, len(batch), cache))
        return cache, prefix_lens

    def _answer_logits(self, adapter, bank, batch: QuestionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        cache, prefix_lens = self._start_upper(batch, adapter, bank)
        h = self._upper(batch.cached, batch.positions, batch.valid, adapter, bank, cache, prefix_lens)
        sel = batch.labels != -100
        return self.head(h[sel]).float(), sel

    def loss(self, adapter, bank, batch: QuestionBatch) -> torch.Tensor:
        """Teacher-forced cross-entropy on the answer tokens, through the upper blocks only (chapter 4)."""
        logits, sel = self._answer_logits(adapter, bank, batch)
        return F.cross_entropy(logits, batch.labels[sel])

    @torch.no_grad()
    def answer_nll(self, adapter, bank, batch: QuestionBatch) -> torch.Tensor:
        """Each question's teacher-forced loss, nats per answer token: the sensitive endpoint (chapter 4)."""
        logits, sel = self._answer_logits(adapter, bank, batch)
        return _per_row(F.cross_entropy(logits, batch.labels[sel], reduction="none"), sel)

    def barred(self, step: int, previous: torch.Tensor | None) -> tuple | None:
        """Where generation may not go at ``step``: (row, token) index pairs for the logits (chapter 4).

        An answer must carry text: the first token may not be blank (a newline, a special token),
        except a bare space, after which the next token may not be blank. Without that exception
        an answer such as " 4817" or " 7 May 2023", whose first token is a bare space, could
        never be produced.
        """
        if step == 0:
            allowed = torch.isin(self.blank_ids, self.space_ids)
            return (slice(None), self.blank_ids[~allowed])
        if step == 1 and previous is not None:
            after_space = torch.isin(previous, self.space_ids).nonzero()
            if len(after_space):
                return (after_space, self.blank_ids.unsqueeze(0))
        return None

    def can_generate(self, answers: list[str]) -> np.ndarray:
        """Whether each answer's tokens, as training targets them, pass :meth:`barred` (chapter 4).

        The forced-generation instrument: an answer that fails can never be generated, however
        well a read is trained.
        """
        ok = []
        for answer in answers:
            tokens = torch.tensor(self._tok(" " + answer.strip())[: self.answer_tokens], device=self.device)
            passed, previous = bool(answer.strip()), None  # an empty answer is never generated
            for step, token in enumerate(tokens):
                barred = self.barred(step, previous)  # for this one row, when it applies
                if barred is not None and bool(torch.isin(token, barred[1]).any()):
                    passed = False
                previous = token.view(1)
            ok.append(passed)
        return np.array(ok, bool)

    @torch.no_grad()
    def generate(self, adapter, bank, batch: QuestionBatch, max_new_tokens: int) -> list[str]:
        """Greedy answers, cut at the first newline; the first token must carry text (chapter 4).

        Barring blank and special first tokens (the newline among them; :meth:`barred`) keeps an
        answer from being empty: the frozen model often starts with a newline, and an adapter
        trained on short answers that end in one learns a general pull towards it.
        """
        cache_u, prefix_lens = self._start_upper(batch, adapter, bank)
        cache_l = batch.lower_cache.copy()
        valid, pos = batch.valid, batch.positions
        h = self._upper(batch.cached, pos, valid, adapter, bank, cache_u, prefix_lens)
        out = []
        for step in range(max_new_tokens):
            logits = self.head(h[:, -1])
            barred = self.barred(step, out[-1][:, 0] if out else None)
            if barred is not None:
                logits[barred] = -torch.inf
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if step == max_new_tokens - 1 or bool((torch.cat(out, 1) == self.stop_id).any(1).all()):
                break
            valid = torch.cat([valid, torch.ones_like(nxt, dtype=torch.bool)], 1)
            pos = pos[:, -1:] + 1
            hl = self._run(self.embed(nxt), pos, valid, range(self.inject), cache_l, batch.prefix_lens)
            h = self._upper(hl, pos, valid, adapter, bank, cache_u, prefix_lens)
        return _decode(self.tokenizer, torch.cat(out, 1), self.stop_id)


def _per_row(token_losses: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Token losses (in the order of ``sel``'s true entries) averaged per row of ``sel``."""
    rows = sel.nonzero()[:, 0]
    total = torch.zeros(sel.shape[0], device=token_losses.device).index_add_(0, rows, token_losses)
    return total / sel.sum(1).clamp_min(1)


def _decode(tokenizer, ids: torch.Tensor, stop_id: int | None) -> list[str]:
    texts = []
    for row in ids.tolist():
        if stop_id is not None and stop_id in row:
            row = row[: row.index(stop_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


class EncoderDecoderBackbone:
    """A frozen T5 (the paper's family; chapter 4). The encoder output of every turn and question is cached.

    m1 prepends memory tokens to the encoder input (the encoder is re-run, with gradient into the
    tokens); m3 appends memory tokens to the encoder output, so every decoder cross-attention sees
    them as extra keys and values; m2/m4/m5/m6 add their read to the output of decoder block
    ``inject_block``. Turns are written from the encoder output, so ``write_block`` (accepted for
    the same call as :class:`DecoderOnlyBackbone`) is not used.
    """

    family = "encoder-decoder"

    def __init__(self, model, tokenizer, *, inject_block: int, write_block: int | None = None,
                 question_tokens: int = 24, answer_tokens: int = 8, turn_tokens: int = 24, device="auto"):
        self.model, self.tokenizer = model, tokenizer
        self.device = _model_device(model, device)
        self.blocks = transformer_blocks(model)
        if not isinstance(inject_block, int) or not 0 <= inject_block < len(self.blocks):
            raise ParameterError(f"inject_block must index a decoder block in [0, {len(self.blocks) - 1}], got {inject_block!r}")
        self.inject = inject_block
        self.question_tokens, self.answer_tokens, self.turn_tokens = question_tokens, answer_tokens, turn_tokens
        self.stop_id = tokenizer.eos_token_id

    @property
    def width(self) -> int:
        """Hidden width ``d`` of the backbone (chapter 4)."""
        return self.model.config.d_model

    def to(self, device) -> "EncoderDecoderBackbone":
        """Move the frozen model to ``device`` (chapter 4)."""
        self.device = _model_device(self.model, device)
        return self

    def _encode_ids(self, texts, limit):
        rows = [self.tokenizer.encode(t, add_special_tokens=False)[:limit] + [self.stop_id] for t in texts]
        ids = _padded(rows, self.tokenizer.pad_token_id, self.device, left=False)
        mask = _padded([[1] * len(r) for r in rows], 0, self.device, left=False)
        return ids, mask, rows

    @torch.no_grad()
    def encode_turns(self, texts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Encoder output of "context: <turn>" for each turn (no gradient; chapter 4)."""
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask, rows = self._encode_ids(["context: " + t for t in texts[start:start + batch_size]], self.turn_tokens)
            h = self.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            out += [h[i, : len(r)].clone() for i, r in enumerate(rows)]
        return out

    @torch.no_grad()
    def prepare(self, questions, answers=None, *, context=None, context_tokens=0, contexts=None) -> QuestionBatch:
        """Encode "question: <q>" (with optional context text) once; the encoder output is cached (chapter 4)."""
        ctx = contexts or [context[-4 * context_tokens:] if context else None] * len(questions)
        texts = [("context: " + c + " " if c else "") + "question: " + q for c, q in zip(ctx, questions)]
        ids, mask, _ = self._encode_ids(texts, self.question_tokens + (4 * context_tokens if any(ctx) else 0))
        enc = self.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        labels = None
        if answers:
            rows = [self.tokenizer.encode(a.strip(), add_special_tokens=False)[: self.answer_tokens] + [self.stop_id]
                    for a in answers]
            labels = _padded(rows, -100, self.device, left=False)
        return QuestionBatch(ids, mask.bool(), None, labels, enc)

    def _encoder_states(self, adapter, bank, batch):
        enc, mask = batch.cached, batch.valid.long()
        if adapter is None:
            return enc, mask
        if adapter.injection == "prefix":
            tokens = _per_batch(adapter.memory_tokens(bank)).expand(len(batch), -1, -1)
            embeds = torch.cat([tokens, self.model.get_input_embeddings()(batch.ids)], 1)
            mask = torch.cat([torch.ones(len(batch), tokens.shape[1], dtype=torch.long, device=self.device), mask], 1)
            enc = self.model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        elif adapter.injection == "kv":
            tokens = _per_batch(adapter.memory_tokens(bank)).expand(len(batch), -1, -1)
            enc = torch.cat([enc, tokens], 1)
            mask = torch.cat([mask, torch.ones(len(batch), tokens.shape[1], dtype=torch.long, device=self.device)], 1)
        return enc, mask

    @contextmanager
    def _hook(self, adapter, bank):
        handle = None
        if adapter is not None and adapter.injection == "residual":
            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                h = h + adapter.residual(h, bank)
                return (h, *output[1:]) if isinstance(output, tuple) else h
            handle = self.blocks[self.inject].register_forward_hook(hook)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def _forward(self, adapter, bank, batch):
        from transformers.modeling_outputs import BaseModelOutput

        enc, mask = self._encoder_states(adapter, bank, batch)
        with self._hook(adapter, bank):
            return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask,
                              labels=batch.labels)

    def loss(self, adapter, bank, batch):
        """Teacher-forced cross-entropy on the answer tokens through the frozen decoder (chapter 4)."""
        return self._forward(adapter, bank, batch).loss

    @torch.no_grad()
    def answer_nll(self, adapter, bank, batch):
        """Each question's teacher-forced loss, nats per answer token: the sensitive endpoint (chapter 4)."""
        logits = self._forward(adapter, bank, batch).logits.float()
        sel = batch.labels != -100
        return _per_row(F.cross_entropy(logits[sel], batch.labels[sel], reduction="none"), sel)

    @torch.no_grad()
    def generate(self, adapter, bank, batch, max_new_tokens):
        """Greedy answers, never empty (``min_new_tokens=1``, as in the decoder-only path; chapter 4)."""
        from transformers.modeling_outputs import BaseModelOutput

        enc, mask = self._encoder_states(adapter, bank, batch)
        with self._hook(adapter, bank):
            ids = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask,
                                      max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False, num_beams=1)
        return _decode(self.tokenizer, ids, self.stop_id)


def make_backbone(model, tokenizer, **kwargs):
    """The right backbone wrapper for ``model``'s family (chapter 4).

    ``device`` (default ``"auto"``: CUDA when present, else the CPU) is where the frozen model is
    moved and every tensor the backbone creates lives.
    """
    cls = EncoderDecoderBackbone if model.config.is_encoder_decoder else DecoderOnlyBackbone
    return cls(model, tokenizer, **kwargs)


def hidden_rms(batch: QuestionBatch) -> float:
    """Typical RMS of the cached states where memory enters: the adapters' initial output scale (chapter 4)."""
    h = batch.cached[batch.valid]
    return float(h.pow(2).mean().sqrt())
