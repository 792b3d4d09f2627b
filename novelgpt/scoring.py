"""A GPT scored on a whole split, token by token: every target once, each with at least `context` tokens before it.

    logp = token_log_probs(model, val_ids, context=64)   # (N-1,) ln p_gpt of every token but the first
    nats = whole_split_loss(model, val_ids)               # their mean, negated
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from novelgpt.ngram import check_ids


def window_starts(n_tokens: int, block_size: int, context: int) -> list[int]:
    """Starts of the windows that score targets 1..n_tokens-1: stride block_size - context, so every window
    after the first re-reads `context` tokens and scores only the targets past them."""
    stride = block_size - context
    starts = [0]
    while starts[-1] + block_size < n_tokens - 1:  # the last window does not reach the last target yet
        starts.append(starts[-1] + stride)
    return starts


def window_batch(tokens: np.ndarray, starts: list[int], block_size: int, context: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the windows at `starts`, (B, T) each; targets already scored, or past the end
    of the split (the padding of a short last window), are -1."""
    x = torch.zeros(len(starts), block_size, dtype=torch.long)
    y = torch.full((len(starts), block_size), -1, dtype=torch.long)
    for row, start in enumerate(starts):
        window = torch.from_numpy(tokens[start:start + block_size + 1])
        n = len(window) - 1
        x[row, :n], y[row, :n] = window[:-1], window[1:]
        if start > 0:
            y[row, :context] = -1  # the previous window scored these
    return x, y


def autocast_context(autocast: torch.dtype | AbstractContextManager | None, device_type: str
                     ) -> AbstractContextManager:
    """A context for the forward passes: none for None or float32, torch.autocast for another dtype."""
    if autocast is None or autocast == torch.float32:
        return nullcontext()
    if isinstance(autocast, torch.dtype):
        return torch.autocast(device_type, dtype=autocast)
    return autocast


@torch.no_grad()
def token_log_probs(model: torch.nn.Module, ids: np.ndarray, context: int = 64, batch_size: int = 16,
                    autocast: torch.dtype | AbstractContextManager | None = None) -> np.ndarray:
    """(N-1,) float64 ln p_gpt of every token of ids but the first, each predicted from at least `context`
    tokens (fewer only at the very start); autocast: None (float32), a dtype, or a context."""
    config = model.config
    if not 0 <= context < config.block_size:
        raise ValueError(f"--context must be in 0..{config.block_size - 1} (below the model's block_size "
                         f"{config.block_size}), got {context}")
    tokens = check_ids(ids, config.vocab_size, "ids")
    if len(tokens) < 2:
        raise ValueError(f"ids has {len(tokens)} tokens; scoring needs at least 2")
    device = next(model.parameters()).device
    starts = window_starts(len(tokens), config.block_size, context)
    out = np.full(len(tokens) - 1, np.nan)
    was_training = model.training
    model.eval()
    try:
        with autocast_context(autocast, device.type):
            for first in range(0, len(starts), batch_size):
                batch = starts[first:first + batch_size]
                x, y = window_batch(tokens, batch, config.block_size, context)
                logits, _ = model(x.to(device), y.to(device))  # (B, T, V)
                logp = torch.log_softmax(logits.float(), dim=-1)
                picked = logp.gather(-1, y.clamp(min=0).to(device)[..., None])[..., 0].double().cpu()  # (B, T)
                for row, start in enumerate(batch):
                    keep = y[row] >= 0
                    at = start + torch.nonzero(keep)[:, 0].numpy()  # the target at window slot t is ids[start+t+1]
                    out[at] = picked[row][keep].numpy()
    finally:
        model.train(was_training)
    assert not np.isnan(out).any(), "the windows must score every token but the first exactly once"
    return out


def whole_split_loss(model: torch.nn.Module, ids: np.ndarray, context: int = 64, batch_size: int = 16,
                     autocast: torch.dtype | AbstractContextManager | None = None) -> float:
    """Mean cross-entropy (nats) of a GPT on every token of ids but the first (see token_log_probs)."""
    return float(-token_log_probs(model, ids, context, batch_size, autocast).mean())
