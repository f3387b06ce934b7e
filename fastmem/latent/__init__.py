"""Trained persistent memory in a frozen model's latent space: six methods on LoCoMo (chapter 4).

Chapter 4 re-implements arXiv:2603.16413 (Jeong 2026), one concept a module:

- :mod:`~fastmem.latent.adapters`: the memory bank, its gradient-free write rules and trained reads
  (``LatentAdapter``, the method table ``METHODS``);
- :mod:`~fastmem.latent.backbones`: the frozen decoder-only or encoder-decoder model the adapter
  reads into, with its cached states;
- :mod:`~fastmem.latent.training`: training the read side (early stopping on a held-out conversation);
- :mod:`~fastmem.latent.experiment`: the chapter's protocol, controls and experiment loop;
- :mod:`~fastmem.latent.curriculum`: invented facts to teach and test a read;
- :mod:`~fastmem.latent.instruments`: why a read does or does not learn (bank probe, gradient,
  generation, collapse);
- :mod:`~fastmem.latent.forgetting`: the forgetting curve over lag;
- :mod:`~fastmem.latent.serving`: a trained residual-read adapter served inside the model's own
  forward pass (``ServedAdapter``), as chapter 5's benchmark attaches it;
- :mod:`~fastmem.latent.devices`: where the tensors live (CUDA when present, else the CPU).

LoCoMo's conversations and questions are read by :mod:`fastmem.data`; answer F1 and BM25 retrieval
are in :mod:`fastmem.evaluation`.
"""

from .adapters import (CAPACITY_ROWS, DESIGN_NAMES, DESIGNS, INJECTION, METHOD_NAMES, METHODS, WRITE_RULES,
                       LatentAdapter, shared_features, write_centre)
from .backbones import DecoderOnlyBackbone, EncoderDecoderBackbone, QuestionBatch, hidden_rms, make_backbone
from .devices import resolve_device
from .forgetting import LAG_EDGES, LAG_LABELS, forgetting_curve, isotonic_nonincreasing, lag_bucket
from .training import train_adapter, train_until_plateau
from .serving import ServedAdapter
from .experiment import CONDITIONS, Curriculum, asking_points, paired_endpoint, run_latent_experiment, text_contexts
from .curriculum import fact_curriculum
from .instruments import constant_agreement, effective_rows, modal_share, probe_bank, read_gradient

__all__ = ["CAPACITY_ROWS", "DESIGN_NAMES", "DESIGNS", "INJECTION", "METHOD_NAMES", "METHODS", "WRITE_RULES",
           "LatentAdapter", "shared_features", "write_centre", "Curriculum", "fact_curriculum",
           "constant_agreement", "effective_rows", "modal_share", "probe_bank", "read_gradient",
           "DecoderOnlyBackbone", "EncoderDecoderBackbone", "QuestionBatch", "hidden_rms", "make_backbone",
           "LAG_EDGES", "LAG_LABELS", "forgetting_curve", "isotonic_nonincreasing", "lag_bucket",
           "train_adapter", "train_until_plateau", "CONDITIONS", "asking_points", "paired_endpoint",
           "run_latent_experiment", "text_contexts", "resolve_device", "ServedAdapter"]
