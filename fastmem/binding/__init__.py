"""The one-shot binding memory of seed 000 and its selective revision (chapter 2), one part a module.

- :mod:`~fastmem.binding.memory`: prompt states, keys, the key projector, stored values, writing
  and saving (``BindingMemory``);
- :mod:`~fastmem.binding.selection`: which value a query receives: top-1 retrieval, the selective
  gate, the GRACE-style codebook, thresholds fitted on held-out training words;
- :mod:`~fastmem.binding.scoring`: generation with an injected value, the chapter's columns and the
  in-context baseline;
- :mod:`~fastmem.binding.capacity`: thousands of bindings written in shared passes, Read as the
  memory grows;
- :mod:`~fastmem.binding.serving`: the memory served inside the model's own forward pass by hooks
  (``ServedBinding``), gated or not, as chapter 5's benchmark attaches it;
- :mod:`~fastmem.binding.cost`: the served memory timed beside a positive control, and its FLOPs.

Read: the question's key retrieves the top-1 stored key by cosine similarity (one matrix
product); the retrieved value is added to the state entering the output head at the answer
position, and the model then generates greedily. The model's weights are never touched.
"""

from .memory import (MEMORY_KIND, CONTEXT_KEYS, PromptStates, key_prefix, context_span, prompt_states, KeyProjector,
                     train_projector, BindingMemory, retrieve, retrieve_among, memory_values, write_memory,
                     encode_bindings, encode_unrelated, synthetic_memory)
from .selection import (MODES, ContextGate, context_presence, presence_scores, gate_scores, gate_scores_of,
                        separating_threshold, fit_gate, Codebook, grace_codebook, grace_radii, fit_grace_threshold,
                        token_centre, after_first_token, select_values, SeedFit, fit_seed, calibrate_threshold)
from .scoring import (generate, exact_match, contains_any, changed, forced_choice, COPY_MODE, COLUMNS, score_columns,
                      score_records, rate_intervals, paired_rows, paired_comparisons, paired_cosine, in_context_scores,
                      in_context_prompts)
from .capacity import write_pool, Pool, CAPACITY_MODES, capacity_records
from .serving import ServedBinding, GateReading, attached
from .replication import (SEED_MODES, SEED_VALUES, SEED_CONTEXTS, SEED_SAME_CONTEXT, SEED_TRANSFER, NO_MEMORY,
                          seed_row, seed_projector, SeedTaskRun, seed_task_run, tradeoff_outcomes, TradeoffPoint,
                          tradeoff_curve, pareto_front, seed_reading, tradeoff_figure, seed_table, transfer_table)
from .cost import busy_pause, slowed, measure_overhead, retrieval_flops, forward_flops_per_token

__all__ = ["MEMORY_KIND", "CONTEXT_KEYS", "PromptStates", "key_prefix", "context_span", "prompt_states", "KeyProjector",
           "train_projector", "BindingMemory", "retrieve", "retrieve_among", "memory_values", "write_memory",
           "encode_bindings", "encode_unrelated", "synthetic_memory", "MODES", "ContextGate", "context_presence",
           "presence_scores", "gate_scores", "gate_scores_of", "separating_threshold", "fit_gate", "Codebook",
           "grace_codebook", "grace_radii", "fit_grace_threshold", "token_centre", "after_first_token", "select_values", "SeedFit",
           "fit_seed", "calibrate_threshold", "generate", "exact_match", "contains_any", "changed", "forced_choice",
           "COPY_MODE", "COLUMNS", "score_columns", "score_records", "rate_intervals", "paired_rows", "paired_cosine",
           "in_context_scores", "in_context_prompts", "write_pool", "Pool", "CAPACITY_MODES", "capacity_records",
           "ServedBinding", "GateReading", "attached", "busy_pause", "slowed", "measure_overhead", "retrieval_flops",
           "forward_flops_per_token"]
