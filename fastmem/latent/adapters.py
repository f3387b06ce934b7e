"""The memory bank and its adapter: six methods of writing into and reading from it (chapter 4).

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

Writes carry no gradient, so a bank is written once per run; adapters that share a ``write_seed``
share their write projections, computed once for all of them (:func:`shared_features`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ParameterError
from ..models import ModelInfo, model_info
from ..names import LATENT_METHODS
from ..persistence import StoredMemory, load_memory, save_memory
from .devices import resolve_device

METHODS = LATENT_METHODS
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
MEMORY_KIND = "latent_adapter"


@dataclass(frozen=True)
class Design:
    """How states are written and how the read starts (chapter 4, "Why the first read could not learn").

    ``centred``: states of massive norm (the attention sink at a sequence's first position,
    about a hundred times the others' norm and without content) are not written, and each state
    has the training turns' mean state subtracted and is RMS-normalised before the write (the
    shared direction otherwise sends most tokens to the same rows);
    ``normalised_rows``: a token is addressed against the RMS-normalised rows, so that a row
    that already holds much does not draw every later token to itself (with raw rows the
    content term grows with the row); ``address_scale`` multiplies the address logits, so that
    a normalised token lands on a few rows rather than a little on every row; ``gate`` is the
    gate's initial value, and ``zero_output`` starts the read's output projection at zero
    instead (as LoRA and ControlNet do): with the paper's closed gate, ``tanh(0) = 0`` multiplies the whole read, so no gradient
    reaches what the read retrieves.
    """

    name: str
    centred: bool
    normalised_rows: bool
    address_scale: float
    gate: float
    zero_output: bool


DESIGNS = {
    "paper": Design("paper", centred=False, normalised_rows=False, address_scale=1.0, gate=0.0, zero_output=False),
    "repaired": Design("repaired", centred=True, normalised_rows=True, address_scale=4.0, gate=1.0, zero_output=True),
}
DESIGN_NAMES = {"paper": "the paper's write and read", "repaired": "repaired write and read"}


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMS normalisation of the last axis; a zero row stays exactly zero (chapter 4)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


SINK_NORM_RATIO = 10.0


def content_states(states: torch.Tensor) -> torch.Tensor:
    """One turn's states without those of massive norm, more than ``SINK_NORM_RATIO`` times the median (chapter 4).

    The first position of a sequence is an attention sink whose state dwarfs the others; it
    holds no content of the turn, and left in it dominates the mean and every address.
    """
    norms = states.norm(dim=-1)
    return states[norms <= SINK_NORM_RATIO * norms.median()]


def write_centre(states: list[torch.Tensor]) -> torch.Tensor:
    """The mean content state of many turns: what a centred write subtracts (chapter 4)."""
    return torch.cat([content_states(s) for s in states]).float().mean(0)


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

    ``device`` (``"auto"``: CUDA when present, else the CPU): the parameters are drawn on the CPU,
    so an adapter's initial weights do not depend on the device, then moved there; every bank it
    creates lives there too.
    """

    def __init__(self, method: str, width: int, rows: int, *, gamma: float = 0.95, top_k: int = 8,
                 train_write: bool = False, seed: int = 0, write_seed: int | None = None,
                 hidden_rms: float = 1.0, model: ModelInfo | None = None, design: str = "paper",
                 centre: torch.Tensor | None = None, device="auto"):
        super().__init__()
        if method not in METHODS:
            raise ParameterError(f"unknown latent-memory method {method!r}: use one of {', '.join(METHODS)}")
        if design not in DESIGNS:
            raise ParameterError(f"unknown latent-memory design {design!r}: use one of {', '.join(DESIGNS)}")
        if not isinstance(rows, int) or rows < 1:
            raise ParameterError(f"memory rows must be a positive integer, got {rows!r}")
        if not 0.0 < gamma <= 1.0:
            raise ParameterError(f"decay gamma must lie in (0, 1], got {gamma!r}")
        if method == "m6" and not 1 <= top_k <= rows:
            raise ParameterError(f"slot top_k must lie in [1, rows={rows}], got {top_k!r}")
        self.method, self.width, self.rows, self.gamma, self.top_k = method, width, rows, float(gamma), int(top_k)
        self.train_write, self.seed = bool(train_write), int(seed)
        self.design = DESIGNS[design]
        self.model = model  # the backbone it reads into: recorded by save(), checked by load()
        self.write_seed = int(seed if write_seed is None else write_seed)
        d = width
        g = torch.Generator().manual_seed(10_000 + self.write_seed)
        scale = 1 / math.sqrt(d)
        cpu = torch.device("cpu")  # seeded draws on the CPU: the same weights on every device
        self.w_q = nn.Parameter(torch.randn(d, d, generator=g, device=cpu) * scale, requires_grad=self.train_write)
        self.w_k = nn.Parameter(torch.randn(d, d, generator=g, device=cpu) * scale, requires_grad=self.train_write)
        self.w_v = nn.Parameter(torch.randn(d, d, generator=g, device=cpu) * scale, requires_grad=self.train_write)
        # row addresses: the first `rows` of one fixed draw of 640, so 1x and 10x share their first rows
        big = max(rows, CAPACITY_ROWS["10x"])
        self.register_buffer("addresses", torch.randn(big, d, generator=g, device=cpu)[:rows].clone())
        # the mean state subtracted before a centred write (zeros: nothing subtracted)
        self.register_buffer("centre", torch.zeros(d, device=cpu) if centre is None
                             else centre.detach().to(cpu, torch.float32).clone())
        torch.manual_seed(self.seed)
        self.log_scale = nn.Parameter(torch.tensor(math.log(max(hidden_rms, 1e-3)), device=cpu))
        inj = INJECTION[method]
        if inj in ("prefix", "kv"):
            self.proj = nn.Linear(d, d)
        else:
            self.gate = nn.Parameter(torch.tensor(self.design.gate, device=cpu))
            self.q = nn.Linear(d, d, bias=False)
            self.o = nn.Linear(d, d, bias=False)
            if self.design.zero_output:
                nn.init.zeros_(self.o.weight)
            if method in ("m2", "m5"):
                self.k = nn.Linear(d, d, bias=False)
                self.v = nn.Linear(d, d, bias=False)
            if method == "m5":
                self.gate_net = nn.Linear(d, d)
                nn.init.constant_(self.gate_net.bias, -1.0)
        self.to(resolve_device(device))

    def save(self, path: Path | str) -> Path:
        """Write the adapter, read and write side, to a memory file with its settings and model (chapter 4)."""
        if self.model is None:
            raise ParameterError("LatentAdapter.save: this adapter does not record its model: "
                                 "build it with model=fastmem.models.model_info(model)")
        settings = {"method": self.method, "rows": self.rows, "gamma": self.gamma, "top_k": self.top_k,
                    "train_write": self.train_write, "seed": self.seed, "write_seed": self.write_seed,
                    "design": self.design.name}
        return save_memory(path, MEMORY_KIND, self.state_dict(), settings, self.model)

    @classmethod
    def load(cls, path: Path | str, model: nn.Module) -> "LatentAdapter":
        """Rebuild an adapter saved by :meth:`save` for ``model``, checking kind, model and width (chapter 4)."""
        def rebuild(stored: StoredMemory) -> "LatentAdapter":
            settings = dict(stored.settings)
            method, rows = settings.pop("method"), settings.pop("rows")
            adapter = cls(method, stored.width, rows, model=model_info(model), device=_device_of(model),
                          **settings)
            adapter.load_state_dict(stored.tensors)
            return adapter

        return load_memory(path, MEMORY_KIND, model).rebuild(rebuild)

    @property
    def device(self) -> torch.device:
        """Where the adapter's parameters and banks live (chapter 4)."""
        return self.addresses.device

    @property
    def injection(self) -> str:
        """Where the read enters (chapter 4): ``prefix``, ``kv`` or ``residual``."""
        return INJECTION[self.method]

    def extra_repr(self) -> str:
        """Settings shown by ``print(adapter)`` (chapter 4)."""
        return (f"method={self.method}, rows={self.rows}, gamma={self.gamma}, design={self.design.name}, "
                f"train_write={self.train_write}")

    def read_parameters(self) -> list[nn.Parameter]:
        """The trained parameters (chapter 4): the read side, plus the write side in the ablation."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- writing -----------------------------------------------------------------------------
    def empty_bank(self) -> torch.Tensor:
        """An empty bank: ``rows x width`` zeros (chapter 4)."""
        return torch.zeros(self.rows, self.width, device=self.device)

    def turn_features(self, states: list[torch.Tensor]) -> list[tuple]:
        """Project the states of many turns at once: the bank-independent part of every write (chapter 4)."""
        if not states:
            return []
        if self.design.centred:
            states = [content_states(s) for s in states]
        lengths = [s.shape[0] for s in states]
        z = torch.cat(states, 0).to(self.w_q.device, self.w_q.dtype)
        if self.design.centred:
            z = _rms(z - self.centre)
        zq = z @ self.w_q
        zqk = zq @ self.w_k.T
        ze = zq @ self.addresses.T * (self.design.address_scale / math.sqrt(self.width))
        v = z @ self.w_v
        return list(zip(zqk.split(lengths), ze.split(lengths), v.split(lengths)))

    def _update(self, bank: torch.Tensor, feat: tuple, inplace: bool = False) -> torch.Tensor:
        zqk, ze, v = feat
        rule = WRITE_RULES[self.method]
        if rule == "attention":
            rows = _rms(bank) if self.design.normalised_rows else bank
            a = torch.softmax(zqk @ rows.T / math.sqrt(self.width) + ze, dim=-1)  # (L, rows)
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
        """m2/m4/m5/m6: the term added to the residual stream at the injection block (chapter 4).

        ``bank`` is one bank ``(rows, width)`` shared by the batch, or one per question ``(batch, rows, width)``.
        """
        q = self.q(_rms(h))
        mem = _rms(bank)
        if self.method in ("m2", "m5"):
            # q k(mem)^T = (q W_k) mem^T and att v(mem) = v(att mem): with a bank per question this
            # projects the few query positions instead of every bank row
            att = torch.softmax((q @ self.k.weight) @ mem.transpose(-1, -2) / math.sqrt(self.width), -1)
            r = self.v(att @ mem)
        elif self.method == "m4":
            att = torch.softmax(q @ self.addresses.T / math.sqrt(self.width), -1)
            r = att @ mem
        else:
            att = torch.softmax(q @ mem.transpose(-1, -2) / math.sqrt(self.width), -1)
            r = att @ mem
        out = self.o(r)
        if self.method == "m5":
            out = torch.sigmoid(self.gate_net(_rms(h))) * out
        return torch.tanh(self.gate) * self.scale * out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def shared_features(width: int, states: list[torch.Tensor], write_seed: int, design: str = "paper",
                    centre: torch.Tensor | None = None) -> list[tuple]:
    """Write-side projections of many turns for every adapter with this ``write_seed`` and design (chapter 4).

    All methods and both capacities draw the same random write projections and row addresses
    from ``write_seed`` (1x uses the first 64 of the 640 addresses), so one projection pass serves all.
    """
    device = states[0].device if states else "auto"
    ref = LatentAdapter("m2", width, CAPACITY_ROWS["10x"], write_seed=write_seed, design=design, centre=centre,
                        device=device)
    with torch.no_grad():
        return ref.turn_features(states)
