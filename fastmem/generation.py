"""Chat prompts and batched text generation with a Hugging Face model (chapter 3).

Knows nothing of memories: :func:`fastmem.benchmark.generate_with_memory` attaches one around
:func:`generate`.
"""

from __future__ import annotations

import torch


def chat(tokenizer, turns: list[tuple[str, str]], *, open_reply: bool = True) -> str:
    """A chat text from (role, text) turns, ending with the assistant's turn opened unless ``open_reply``
    is false (a finished conversation, as teacher-forced scoring reads it; chapter 3)."""
    messages = [{"role": role, "content": text} for role, text in turns]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=open_reply, tokenize=False)


def left_padded(tokenizer, texts: list[str]):
    """Token ids and attention mask of ``texts`` as one batch, padded on the left (chapter 3).

    Left padding puts every row's last prompt token in the last column, where generation goes on.
    The texts are chat prompts that carry their own special tokens, so none are added.
    """
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Continue ``prompts`` (a batch, left-padded) and return the new token ids of each (chapter 3).

    Each row is cut at its first stop token (padding or end of text) after ``min_new_tokens``.
    Sampling is seeded right before it starts, so two runs of the same prompts draw the same random numbers.
    """
    batch = left_padded(tokenizer, prompts)
    torch.manual_seed(seed)
    options = dict(do_sample=sample, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                   pad_token_id=tokenizer.pad_token_id)
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**batch, **options)
    new = out[:, batch.input_ids.shape[1]:]
    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id, model.generation_config.eos_token_id} - {None}
    results = []
    for row in new.tolist():
        cut = next((i for i, token in enumerate(row) if token in stops and i >= min_new_tokens), len(row))
        results.append(row[:cut])
    return results
