"""Trained persistent memory in a frozen model's latent space: six methods on LoCoMo (chapter 4).

Chapter 4 re-implements arXiv:2603.16413 (Jeong 2026): a memory bank of ``rows`` dense vectors sits
beside a frozen language model. Every conversation turn is *written* into the bank by a fixed rule
with no gradient (write-side projections stay at their random initialisation); a small trained
*read* adapter lets the frozen model use the bank when it answers a question. Six methods span
three injection points and four write rules (``METHODS``):

=====  ===============================  ===========================  ==================================
id     name                             encoder-decoder (T5)         decoder-only (SmolLM2, GPT-NeoX)
=====  ===============================  ===========================  ==================================
m1     prefix                           soft tokens before encoder   soft tokens before the prompt,
                                                                     entering at block ``inject_block``
m2     parallel cross-attention         gated x-attn in decoder      gated x-attn at ``inject_block``
m3     KV extension                     extra cross-attn keys/vals   extra self-attn keys/values of
                                                                     block ``inject_block`` only
m4     Hebbian outer product            gated read in decoder        gated read at ``inject_block``
m5     context-gated branch             gated x-attn + gate net      gated x-attn + gate net
m6     slot memory, sparse top-k write  gated slot read in decoder   gated slot read
=====  ===============================  ===========================  ==================================

Compute is the design problem (chapter 4, "Method"): the backbone is frozen and writes carry no
gradient, so turns are encoded once, banks are written once per run, and for decoder-only models the
hidden states entering ``inject_block`` are cached so that training back-propagates only through
the blocks above it.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import locomo_turns
from .errors import ParameterError
from .evaluation import normalise_answer, token_f1
from .models import final_norm, input_embedding, output_embedding, transformer_blocks

METHODS = ("m1", "m2", "m3", "m4", "m5", "m6")
METHOD_NAMES = {
    "m1": "M.1 prefix",
    "m2": "M.2 parallel cross-attention",
    "m3": "M.3 KV extension",
    "m4": "M.4 Hebbian",
    "m5": "M.5 context-gated branch",
    "m6": "M.6 slot top-k",
}
WRITE_RULES = {"m1": "attention", "m2": "attention", "m3": "attention", "m4": "hebbian", "m5": "attention",
               "m6": "slot"}
INJECTION = {"m1": "prefix", "m2": "residual", "m3": "kv", "m4": "residual", "m5": "residual", "m6": "residual"}
CAPACITY_ROWS = {"1x": 64, "10x": 640}
LAG_EDGES = (0, 32, 64, 128, 256)
LAG_LABELS = ("[0,32)", "[32,64)", "[64,128)", "[128,256)", "[256,inf)")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL_ANSWER = "Not mentioned in the conversation"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMS normalisation of the last axis; a zero row stays exactly zero (chapter 4)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------
# LoCoMo as turns and questions
# ----------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """One LoCoMo conversation as a flat list of turns and its questions (chapter 4)."""

    sample_id: str
    turns: list[str]
    session_of_turn: list[int]
    questions: list[dict] = field(default_factory=list)

    @property
    def n_sessions(self) -> int:
        """Number of sessions in the conversation (chapter 4)."""
        return max(self.session_of_turn) if self.session_of_turn else 0

    def session_ends(self) -> list[int]:
        """Number of turns written after each session 1..n_sessions (chapter 4, accumulation table)."""
        ends, count = [], 0
        for s in range(1, self.n_sessions + 1):
            count += sum(1 for x in self.session_of_turn if x == s)
            ends.append(count)
        return ends


def locomo_conversations(data: list[dict], max_turns: int = 0) -> list[Conversation]:
    """Flatten LoCoMo into turns ("Speaker: text") and questions with lag (chapter 4).

    A question is asked after the whole conversation, so its lag is ``T - min(evidence turn)``
    with ``T`` the number of turns. Adversarial questions (category 5) have no answer field; their
    target is ``ADVERSARIAL_ANSWER``. Questions whose evidence ids match no turn are dropped.
    ``max_turns`` > 0 keeps only each conversation's first turns (and the questions about them).
    """
    out = []
    for conv in data:
        kept = locomo_turns(conv)[:max_turns] if max_turns else locomo_turns(conv)
        index = {dia_id: i for i, (dia_id, _, _) in enumerate(kept)}
        turns, sess = [text for _, _, text in kept], [session for _, session, _ in kept]
        questions = []
        for q in conv["qa"]:
            evidence = [index[e.strip()] for e in q.get("evidence", []) if e.strip() in index]
            if not evidence:
                continue
            answer = q.get("answer")
            answer = ADVERSARIAL_ANSWER if answer is None or q["category"] == 5 else str(answer)
            questions.append({"question": q["question"], "answer": answer, "category": int(q["category"]),
                              "evidence": evidence, "lag": len(turns) - min(evidence),
                              "sample_id": conv["sample_id"]})
        out.append(Conversation(conv["sample_id"], turns, sess, questions))
    return out


def sample_questions(convs: list[Conversation], n: int | None, seed: int) -> list[dict]:
    """A fixed random sample of ``n`` questions, spread evenly over ``convs`` (all when None; chapter 4)."""
    rng = np.random.default_rng(seed)
    if n is None:
        return [q for c in convs for q in c.questions]
    per = [n // len(convs) + (i < n % len(convs)) for i in range(len(convs))]
    chosen = []
    for c, k in zip(convs, per):
        idx = rng.permutation(len(c.questions))[: min(k, len(c.questions))]
        chosen += [c.questions[i] for i in sorted(idx)]
    return chosen


def lag_bucket(lag: int) -> int:
    """Index of the lag bucket [0,32), [32,64), [64,128), [128,256), [256,inf) (chapter 4)."""
    return int(np.searchsorted(LAG_EDGES, lag, side="right") - 1)


def isotonic_nonincreasing(values, weights=None) -> np.ndarray:
    """Weighted least-squares non-increasing fit (pool-adjacent-violators), the paper's smoothing (chapter 4)."""
    y = np.asarray(values, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    blocks = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            wt = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / wt if wt > 0 else (m1 + m2) / 2, wt, c1 + c2])
    return np.concatenate([[m] * c for m, _, c in blocks]) if blocks else y


def forgetting_curve(retained, lags) -> dict:
    """Raw bucket means, counts and the weighted non-increasing isotonic fit of retained scores (chapter 4)."""
    retained, buckets = np.asarray(retained, float), np.array([lag_bucket(l) for l in lags])
    raw = np.array([retained[buckets == b].mean() if (buckets == b).any() else np.nan for b in range(len(LAG_EDGES))])
    counts = np.array([(buckets == b).sum() for b in range(len(LAG_EDGES))])
    ok = counts > 0
    fit = np.full(len(raw), np.nan)
    fit[ok] = isotonic_nonincreasing(raw[ok], counts[ok])
    return {"raw": raw, "fit": fit, "counts": counts, "mean_fit": float(np.nanmean(fit))}


def seed_ci(values) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (chapter 4); the half-width is NaN with one seed."""
    v = np.asarray(values, float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def bm25_top_k(query: str, docs: list[str], k: int, k1: float = 1.5, b: float = 0.75) -> list[int]:
    """Indices of the ``k`` best BM25 matches of ``query`` among ``docs``, in turn order (chapter 4)."""
    toks = [normalise_answer(d) for d in docs]
    n, avg = len(toks), max(1e-9, sum(map(len, toks)) / max(1, len(toks)))
    df: dict[str, int] = {}
    for t in toks:
        for w in set(t):
            df[w] = df.get(w, 0) + 1
    scores = np.zeros(n)
    for w in set(normalise_answer(query)):
        if w not in df:
            continue
        idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
        for i, t in enumerate(toks):
            tf = t.count(w)
            if tf:
                scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avg))
    top = np.argsort(-scores, kind="stable")[:k]
    return sorted(int(i) for i in top)


# ----------------------------------------------------------------------------------------------
# The adapter: write rule (frozen, gradient-free) and read path (trained)
# ----------------------------------------------------------------------------------------------


class LatentAdapter(nn.Module):
    """One of the six memory methods M.1-M.6 (chapter 4): write side plus trainable read side.

    Write side (``w_q``, ``w_k``, ``w_v``, row ``addresses``): random, frozen unless
    ``train_write`` (the ablation). Write rules, for the states ``Z`` of one turn:

    * attention-coupled (m1, m2, m3, m5): ``A = softmax(Z W_Q (P W_K + E)^T / sqrt d)``,
      ``P <- gamma P + A^T Z W_V``. ``E`` are fixed random row addresses: without them an empty
      bank gives every row the same update and the rows never become different.
    * Hebbian (m4): ``K = Z W_Q E^T / sqrt d``, ``M <- gamma M + K^T Z W_V / ||K^T Z W_V||_F``.
    * slot (m6): the turn's mean state is addressed against ``E``; the ``top_k`` best slots are
      overwritten, ``P_i <- (1 - w_i) P_i + w_i mean(Z W_V)`` with ``w`` the softmax over the top k.

    Read side: m1/m3 map bank rows to tokens (``proj``); m2/m5 are a gated cross-attention
    (Flamingo style, gate ``tanh(gate)`` initialised at 0); m5 adds an input-dependent gate net;
    m4 reads ``softmax(q E^T) M``; m6 attends over the slots. Residual reads have no bias, so a
    zero bank adds exactly nothing.
    """

    def __init__(self, method: str, width: int, rows: int, *, gamma: float = 0.95, top_k: int = 8,
                 train_write: bool = False, seed: int = 0, write_seed: int | None = None,
                 hidden_rms: float = 1.0):
        super().__init__()
        if method not in METHODS:
            raise ParameterError(f"unknown latent-memory method {method!r}: use one of {', '.join(METHODS)}")
        if not isinstance(rows, int) or rows < 1:
            raise ParameterError(f"memory rows must be a positive integer, got {rows!r}")
        if not 0.0 < gamma <= 1.0:
            raise ParameterError(f"decay gamma must lie in (0, 1], got {gamma!r}")
        if method == "m6" and not 1 <= top_k <= rows:
            raise ParameterError(f"slot top_k must lie in [1, rows={rows}], got {top_k!r}")
        self.method, self.width, self.rows, self.gamma, self.top_k = method, width, rows, float(gamma), int(top_k)
        self.train_write, self.seed = bool(train_write), int(seed)
        self.write_seed = int(seed if write_seed is None else write_seed)
        d = width
        g = torch.Generator().manual_seed(10_000 + self.write_seed)
        scale = 1 / math.sqrt(d)
        self.w_q = nn.Parameter(torch.randn(d, d, generator=g) * scale, requires_grad=self.train_write)
        self.w_k = nn.Parameter(torch.randn(d, d, generator=g) * scale, requires_grad=self.train_write)
        self.w_v = nn.Parameter(torch.randn(d, d, generator=g) * scale, requires_grad=self.train_write)
        # row addresses: the first `rows` of one fixed draw of 640, so 1x and 10x share their first rows
        big = max(rows, CAPACITY_ROWS["10x"])
        self.register_buffer("addresses", torch.randn(big, d, generator=g)[:rows].clone())
        torch.manual_seed(self.seed)
        self.log_scale = nn.Parameter(torch.tensor(math.log(max(hidden_rms, 1e-3))))
        inj = INJECTION[method]
        if inj in ("prefix", "kv"):
            self.proj = nn.Linear(d, d)
        else:
            self.gate = nn.Parameter(torch.zeros(()))
            self.q = nn.Linear(d, d, bias=False)
            self.o = nn.Linear(d, d, bias=False)
            if method in ("m2", "m5"):
                self.k = nn.Linear(d, d, bias=False)
                self.v = nn.Linear(d, d, bias=False)
            if method == "m5":
                self.gate_net = nn.Linear(d, d)
                nn.init.constant_(self.gate_net.bias, -1.0)

    @property
    def injection(self) -> str:
        """Where the read enters (chapter 4): ``prefix``, ``kv`` or ``residual``."""
        return INJECTION[self.method]

    def extra_repr(self) -> str:
        """Settings shown by ``print(adapter)`` (chapter 4)."""
        return f"method={self.method}, rows={self.rows}, gamma={self.gamma}, train_write={self.train_write}"

    def read_parameters(self) -> list[nn.Parameter]:
        """The trained parameters (chapter 4): the read side, plus the write side in the ablation."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- writing -----------------------------------------------------------------------------
    def empty_bank(self) -> torch.Tensor:
        """An empty bank: ``rows x width`` zeros (chapter 4)."""
        return torch.zeros(self.rows, self.width)

    def turn_features(self, states: list[torch.Tensor]) -> list[tuple]:
        """Project the states of many turns at once: the bank-independent part of every write (chapter 4)."""
        if not states:
            return []
        lengths = [s.shape[0] for s in states]
        z = torch.cat(states, 0).to(self.w_q.dtype)
        zq = z @ self.w_q
        zqk = zq @ self.w_k.T
        ze = zq @ self.addresses.T / math.sqrt(self.width)
        v = z @ self.w_v
        return list(zip(zqk.split(lengths), ze.split(lengths), v.split(lengths)))

    def _update(self, bank: torch.Tensor, feat: tuple, inplace: bool = False) -> torch.Tensor:
        zqk, ze, v = feat
        rule = WRITE_RULES[self.method]
        if rule == "attention":
            a = torch.softmax(zqk @ bank.T / math.sqrt(self.width) + ze, dim=-1)  # (L, rows)
            return torch.addmm(bank, a.T, v, beta=self.gamma)
        if rule == "hebbian":
            delta = ze.T @ v
            return self.gamma * bank + delta / (delta.norm() + 1e-6)
        scores = ze.mean(0)
        top = torch.topk(scores, self.top_k).indices
        w = torch.softmax(scores[top], 0).unsqueeze(1)
        new = bank if inplace else bank.clone()
        new[top] = (1 - w) * bank[top] + w * v.mean(0, keepdim=True)
        return new

    def write(self, bank: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Write one turn's states ``(L, width)``: gradient-free unless ``train_write`` (chapter 4)."""
        with torch.set_grad_enabled(self.train_write and torch.is_grad_enabled()):
            return self._update(bank, self.turn_features([states])[0])

    def write_turns(self, bank: torch.Tensor, states: list[torch.Tensor] | None = None, snapshots=(),
                    features: list[tuple] | None = None) -> tuple:
        """Write many turns in order with no gradient (chapter 4); also return the bank after each count in ``snapshots``.

        ``features`` (from :func:`shared_features`) replaces ``states``: adapters with the same
        ``write_seed`` share their write projections, so the projections are computed once.
        """
        snaps = {}
        want = set(snapshots)
        with torch.no_grad():
            feats = self.turn_features(states) if features is None else [
                (a, e[:, : self.rows], v) for a, e, v in features]
            bank = bank.clone()
            if 0 in want:
                snaps[0] = bank.clone()
            for i, f in enumerate(feats, start=1):
                bank = self._update(bank, f, inplace=True)  # ``bank`` is this call's own copy
                if i in want:
                    snaps[i] = bank.clone()
        return bank, snaps

    # ---- reading -----------------------------------------------------------------------------
    @property
    def scale(self) -> torch.Tensor:
        """The read's trained output scale, initialised at the hidden-state RMS (chapter 4)."""
        return self.log_scale.exp()

    def memory_tokens(self, bank: torch.Tensor) -> torch.Tensor:
        """m1/m3: bank rows as vectors in the backbone's hidden space ``(rows, width)`` (chapter 4)."""
        return _rms(self.proj(_rms(bank))) * self.scale

    def residual(self, h: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """m2/m4/m5/m6: the term added to the residual stream at the injection block (chapter 4)."""
        q = self.q(_rms(h))
        mem = _rms(bank)
        if self.method in ("m2", "m5"):
            att = torch.softmax(q @ self.k(mem).T / math.sqrt(self.width), -1)
            r = att @ self.v(mem)
        elif self.method == "m4":
            att = torch.softmax(q @ self.addresses.T / math.sqrt(self.width), -1)
            r = att @ mem
        else:
            att = torch.softmax(q @ mem.T / math.sqrt(self.width), -1)
            r = att @ mem
        out = self.o(r)
        if self.method == "m5":
            out = torch.sigmoid(self.gate_net(_rms(h))) * out
        return torch.tanh(self.gate) * self.scale * out


def shared_features(width: int, states: list[torch.Tensor], write_seed: int) -> list[tuple]:
    """Write-side projections of many turns for every adapter with this ``write_seed`` (chapter 4).

    All methods and both capacities draw the same random write projections and row addresses
    from ``write_seed`` (1x uses the first 64 of the 640 addresses), so one projection pass serves all.
    """
    ref = LatentAdapter("m2", width, CAPACITY_ROWS["10x"], write_seed=write_seed)
    with torch.no_grad():
        return ref.turn_features(states)


def save_adapter(adapter: LatentAdapter, path: Path | str) -> Path:
    """Save an adapter's tensors and settings with safetensors (chapter 4; never committed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"method": adapter.method, "width": adapter.width, "rows": adapter.rows, "gamma": adapter.gamma,
            "top_k": adapter.top_k, "train_write": adapter.train_write, "seed": adapter.seed,
            "write_seed": adapter.write_seed}
    state = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, str(path), metadata={"fastmem_latent": json.dumps(meta)})
    return path


def load_adapter(path: Path | str) -> LatentAdapter:
    """Load an adapter written by :func:`save_adapter` (chapter 4)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fastmem_latent"])
    width, rows, method = meta.pop("width"), meta.pop("rows"), meta.pop("method")
    adapter = LatentAdapter(method, width, rows, **meta)
    adapter.load_state_dict(load_file(str(path)))
    return adapter


# ----------------------------------------------------------------------------------------------
# Backbones: where reads enter, what is cached
# ----------------------------------------------------------------------------------------------


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

    def expand(self, batch: int) -> "_KV":
        return _KV({i: t.expand(batch, -1, -1, -1) for i, t in self.k.items()},
                   {i: t.expand(batch, -1, -1, -1) for i, t in self.v.items()})


def _mask(valid: torch.Tensor, n_query: int, prefix: int, dtype) -> torch.Tensor:
    """Additive mask (B, 1, Q, prefix + S): all prefix keys visible, causal and padding over the rest."""
    b, s = valid.shape
    qpos = torch.arange(s - n_query, s).unsqueeze(1)
    allowed = valid[:, None, :] & (torch.arange(s)[None, :] <= qpos)[None]
    if prefix:
        allowed = torch.cat([torch.ones(b, n_query, prefix, dtype=torch.bool), allowed], -1)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


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

    def subset(self, idx) -> "QuestionBatch":
        """The rows ``idx`` of the batch, for a training mini-batch (chapter 4)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
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
                 question_tokens: int = 24, answer_tokens: int = 8, turn_tokens: int = 24):
        self.model, self.tokenizer = model, tokenizer
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
        self.blank_ids = torch.tensor([i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer))))))
                                       if not tokenizer.convert_tokens_to_string([t]).strip()]
                                      + [self.stop_id] + list(tokenizer.all_special_ids))

    @property
    def width(self) -> int:
        """Hidden width ``d`` of the backbone (chapter 4)."""
        return self.embed.weight.shape[1]

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
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.pad_id)
            valid = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                valid[i, : len(r)] = True
            pos = torch.arange(width).expand(len(rows), -1)
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
            a = (self._tok(" " + answers[i])[: self.answer_tokens] + [self.stop_id]) if answers else []
            rows.append(p + a)
            labels.append([-100] * (len(p) - 1) + a + [-100])
        width = max(map(len, rows))
        b = len(rows)
        ids = torch.full((b, width), self.pad_id)
        valid = torch.zeros(b, width, dtype=torch.bool)
        lab = torch.full((b, width), -100)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            valid[i, width - len(r):] = True
            lab[i, width - len(r):] = torch.tensor(labels[i][: len(r)])
        offset, lower_cache, upper_cache, prefix_lens = 0, None, None, {}
        if answers is None:
            lower_cache, upper_cache = _KV(), _KV()
            if context:
                cids = self._tok(context)[-context_tokens:] if context_tokens else self._tok(context)
                offset = len(cids)
                cpos = torch.arange(offset).unsqueeze(0)
                tmp = _KV()
                self._run(self.embed(torch.tensor([cids])), cpos, torch.ones(1, offset, dtype=torch.bool),
                          range(len(self.blocks)), cache=tmp)
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
        tokens = adapter.memory_tokens(bank).unsqueeze(0)
        p = tokens.shape[1]
        layers = range(self.inject, len(self.blocks)) if adapter.injection == "prefix" else [self.inject]
        tmp = _KV()
        self._run(tokens, torch.zeros(1, p, dtype=torch.long), torch.ones(1, p, dtype=torch.bool), layers, cache=tmp)
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

    def loss(self, adapter, bank, batch: QuestionBatch) -> torch.Tensor:
        """Teacher-forced cross-entropy on the answer tokens, through the upper blocks only (chapter 4)."""
        cache, prefix_lens = self._start_upper(batch, adapter, bank)
        h = self._upper(batch.cached, batch.positions, batch.valid, adapter, bank, cache, prefix_lens)
        sel = batch.labels != -100
        logits = self.head(h[sel])
        return F.cross_entropy(logits.float(), batch.labels[sel])

    @torch.no_grad()
    def generate(self, adapter, bank, batch: QuestionBatch, max_new_tokens: int) -> list[str]:
        """Greedy answers, cut at the first newline; the first token must carry text (chapter 4).

        Barring blank and special first tokens (the newline among them) keeps an answer from being empty: the
        frozen model often starts with a newline, and an adapter trained on short answers that end
        in one learns a general pull towards it.
        """
        cache_u, prefix_lens = self._start_upper(batch, adapter, bank)
        cache_l = batch.lower_cache.copy()
        valid, pos = batch.valid, batch.positions
        h = self._upper(batch.cached, pos, valid, adapter, bank, cache_u, prefix_lens)
        out = []
        for step in range(max_new_tokens):
            logits = self.head(h[:, -1])
            if step == 0:
                logits[:, self.blank_ids] = -torch.inf
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if step == max_new_tokens - 1 or bool((torch.cat(out, 1) == self.stop_id).any(1).all()):
                break
            valid = torch.cat([valid, torch.ones_like(nxt, dtype=torch.bool)], 1)
            pos = pos[:, -1:] + 1
            hl = self._run(self.embed(nxt), pos, valid, range(self.inject), cache_l, batch.prefix_lens)
            h = self._upper(hl, pos, valid, adapter, bank, cache_u, prefix_lens)
        return _decode(self.tokenizer, torch.cat(out, 1), self.stop_id)


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
                 question_tokens: int = 24, answer_tokens: int = 8, turn_tokens: int = 24):
        self.model, self.tokenizer = model, tokenizer
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

    def _encode_ids(self, texts, limit):
        rows = [self.tokenizer.encode(t, add_special_tokens=False)[:limit] + [self.stop_id] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
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
            rows = [self.tokenizer.encode(a, add_special_tokens=False)[: self.answer_tokens] + [self.stop_id] for a in answers]
            labels = torch.full((len(rows), max(map(len, rows))), -100)
            for i, r in enumerate(rows):
                labels[i, : len(r)] = torch.tensor(r)
        return QuestionBatch(ids, mask.bool(), None, labels, enc)

    def _encoder_states(self, adapter, bank, batch):
        enc, mask = batch.cached, batch.valid.long()
        if adapter is None:
            return enc, mask
        if adapter.injection == "prefix":
            tokens = adapter.memory_tokens(bank).unsqueeze(0).expand(len(batch), -1, -1)
            embeds = torch.cat([tokens, self.model.get_input_embeddings()(batch.ids)], 1)
            mask = torch.cat([torch.ones(len(batch), tokens.shape[1], dtype=torch.long), mask], 1)
            enc = self.model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        elif adapter.injection == "kv":
            tokens = adapter.memory_tokens(bank).unsqueeze(0).expand(len(batch), -1, -1)
            enc = torch.cat([enc, tokens], 1)
            mask = torch.cat([mask, torch.ones(len(batch), tokens.shape[1], dtype=torch.long)], 1)
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

    def loss(self, adapter, bank, batch):
        """Teacher-forced cross-entropy on the answer tokens through the frozen decoder (chapter 4)."""
        from transformers.modeling_outputs import BaseModelOutput

        enc, mask = self._encoder_states(adapter, bank, batch)
        with self._hook(adapter, bank):
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=mask,
                             labels=batch.labels)
        return out.loss

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
    """The right backbone wrapper for ``model``'s family (chapter 4)."""
    cls = EncoderDecoderBackbone if model.config.is_encoder_decoder else DecoderOnlyBackbone
    return cls(model, tokenizer, **kwargs)


def hidden_rms(batch: QuestionBatch) -> float:
    """Typical RMS of the cached states where memory enters: the adapters' initial output scale (chapter 4)."""
    h = batch.cached[batch.valid]
    return float(h.pow(2).mean().sqrt())


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_adapter(adapter: LatentAdapter, backbone, groups: list[dict], *, epochs: float, lr: float,
                  weight_decay: float, warmup_steps: int, batch_size: int, grad_accum: int,
                  clip: float = 1.0, seed: int = 0, window: int = 8, progress: bool = True) -> list[float]:
    """Train the adapter only (chapter 4): AdamW, linear warm-up then cosine, gradient clipping.

    ``groups``: one per training conversation, ``{"batch": QuestionBatch (teacher forcing),
    "bank": bank after the whole conversation}``; in the ablation ``"bank_before_window"`` and
    ``"window_states"`` (the states of the turns re-written with gradient) replace ``"bank"``.
    Writes carry no gradient, so with frozen write projections the banks are fixed inputs. In the
    ablation (``adapter.train_write``) the last ``window`` turns are re-written with gradient every
    step onto the detached bank before them: truncated back-propagation over ``window`` turns.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    batches = []
    n_epochs = max(1, math.ceil(epochs))
    for epoch in range(n_epochs):
        epoch_batches = []
        for gi, g in enumerate(groups):
            order = rng.permutation(len(g["batch"]))
            epoch_batches += [(gi, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        rng.shuffle(epoch_batches)
        if epoch == n_epochs - 1 and epochs < n_epochs:
            epoch_batches = epoch_batches[: max(1, round(len(epoch_batches) * (epochs - epoch)))]
        batches += epoch_batches
    total = max(1, len(batches) // grad_accum)
    params = adapter.read_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup_steps))
    losses = []
    bar = tqdm(range(total), desc=f"train {adapter.method} {adapter.rows} rows", disable=not progress,
               file=sys.stdout, mininterval=10, leave=False)
    adapter.train()
    for step in bar:
        opt.zero_grad()
        acc = 0.0
        for gi, idx in batches[step * grad_accum:(step + 1) * grad_accum]:
            g = groups[gi]
            bank = g.get("bank")
            if adapter.train_write:
                bank = g["bank_before_window"]
                for z in g["window_states"][-window:]:
                    bank = adapter.write(bank, z)
            loss = backbone.loss(adapter, bank, g["batch"].subset(idx)) / grad_accum
            loss.backward()
            acc += loss.item()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(acc)
        bar.set_postfix(loss=f"{acc:.3f}", refresh=False)
    adapter.eval()
    return losses


def answer_f1(predictions: list[str], questions: list[dict]) -> np.ndarray:
    """SQuAD/LoCoMo token F1 of each prediction against its gold answer (chapter 4)."""
    return np.array([token_f1(p, q["answer"]) for p, q in zip(predictions, questions)])
