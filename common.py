"""Plumbing shared by every method script: nothing here is an RL algorithm.

grpo.py, tempo.py, dcpo.py, spo.py and token_dpo.py import this file for the parts that are
the same in all of them, so that each script shows its own algorithm and little else. The
sections come in the order a reader needs them.

To follow grpo.py's training loop, read 1-5 (in the order of the loop's steps), then 6-8 (its
setup):

  1. sampling        batched KV-cached generation, the completion mask (first EOS included),
                     the decoded completions                                    (loop step 1)
  2. verifiers       extract_answer / is_correct / reward_fn: bounded, never eval or exec;
                     the rollout's reward and length statistics                 (loop step 1)
  3. log-probs       per-token log-probs of completion tokens only, without an fp32 vocab copy;
                     the no-grad pass (loop step 2); hidden states for a chunked head
  4. the update      metrics averaged over micro-batches and passes; the optimizer step with
                     gradient clipping, which skips a non-finite gradient       (loop step 4)
  5. evaluation      greedy held-out accuracy                                   (loop step 5)
  6. tasks           the embedded arithmetic task, GSM8K from JSONL, prompt formatting
  7. pairs           preference pairs for token_dpo.py: a JSONL file, tokenised, batched
                     (token_dpo.py's data, as 6 is the RL scripts'; grpo.py never uses it)
  8. models          any Hugging Face causal LM (and `--model tiny`), frozen copies, devices,
                     dtypes, seeding

Plumbing a learner may skip: it makes the scripts safe to run, stop and resume, not different.

  9. CLI             parse_args(Args): argparse built from a dataclass, one help line per field;
                     run_main: parse, check, run, and turn every error into one line
 10. errors          UserError -> one clear line on stderr, exit code 2; every flag's range
 11. runs            run folder, config.json, metrics.jsonl, atomic checkpoints, resume, Run,
                     the prompt order, the summary line
 12. credit view     one group's completions, each token with its advantage, as text
                     (--show-credit in tempo.py, spo.py and token_dpo.py)
 13. tiny model      the embedded model: character tokenizer, Llama config, warm start (SFT)

The advantage and the loss of each method live in that method's own file, on purpose.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import typing
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. Sampling: left-padded prompts, one KV-cached generate call per batch, the decoded text
# ----------------------------------------------------------------------------------------


def tokenize_prompts(tokenizer, examples: list[dict], task: str, max_len: Optional[int],
                     max_completion_length: int) -> list[list[int]]:
    """Token ids of each example's prompt. Refuses prompts that do not fit the context."""
    out = []
    for ex in examples:
        ids = tokenizer(format_prompt(tokenizer, ex["question"], task),
                        add_special_tokens=False)["input_ids"]
        if max_len is not None and len(ids) + max_completion_length > max_len:
            raise UserError(f"prompt of example {ex['id']} has {len(ids)} tokens, and with "
                            f"--max-completion-length {max_completion_length} it exceeds the "
                            f"model's context of {max_len}; shorten the prompt or lower "
                            "--max-completion-length")
        out.append(ids)
    return out


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5,6],[7]] -> ids [[5,6],[pad,7]], mask [[1,1],[0,1]] (left padding, for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             max_new_tokens: int, num_generations: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0,
             greedy: bool = False, row_keys: Optional[list[int]] = None) -> torch.Tensor:
    """Sample `num_generations` completions per prompt in one batched, KV-cached call.

    Returns completion ids [P*G, L] (L <= max_new_tokens), GROUP-CONTIGUOUS: rows g*G..g*G+G-1
    belong to prompt g. The generation config is built here from our arguments only, so a
    hub model's own generation_config.json (top_k=20, repetition_penalty, ...) cannot change
    the sampler: with top_p=1 and top_k=0 it samples exactly softmax(logits / T).

    row_keys (one int per prompt row, num_generations must be 1): each row draws from its own
    random stream (KeyedSampler), so a row's sample does not depend on which rows share the
    call, their order or their padding. Used where a batched result must equal a
    one-row-at-a-time one (SPO's Monte Carlo values).
    """
    from transformers import GenerationConfig

    keyed = row_keys is not None and not greedy
    if keyed and (num_generations != 1 or len(row_keys) != prompt_ids.size(0)):
        raise ValueError("row_keys needs one key per prompt row and num_generations == 1 "
                         "(repeat the rows instead)")
    # Every sampling knob is set explicitly: transformers fills knobs left at None from the
    # model's own generation_config.json, which may hold temperature 0.7 or repetition_penalty.
    # (Greedy decoding ignores the sampling knobs, so they are only set when sampling.)
    sample = not greedy and not keyed  # keyed sampling picks the token; generate() takes its argmax
    sampling = (dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=0.0, typical_p=1.0)
                if sample else {})
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, **sampling, repetition_penalty=1.0,
        no_repeat_ngram_size=0, num_beams=1, num_return_sequences=num_generations if sample else 1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    extra = ({"logits_processor": [KeyedSampler(row_keys, temperature, top_p, top_k)]}
             if keyed else {})
    was_training = model.training  # train mode only under --gradient-checkpointing: no KV cache
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                             generation_config=cfg, **extra)
    finally:
        model.train(was_training)
    return out[:, prompt_ids.size(1):]


@torch.no_grad()
def generate_continuations(model, tokenizer, rows: list[list[int]], n: int, budgets: list[int],
                           keys: list[int], temperature: float = 1.0, top_p: float = 1.0,
                           top_k: int = 0) -> list[list[int]]:
    """n keyed continuations of each token row, the n sharing one prefill of their row.

    Continuation j of row p is output p*n + j, drawn from the stream keys[p*n + j]
    (KeyedSampler), and cut at its first EOS (kept) or after budgets[p] tokens. Sample for
    sample, that is generate() on the rows repeated n times, with row_keys=keys, cut the same
    way (tested). It costs less in two ways:
      - each row's prefix is encoded once, and its KV cache repeated n times;
      - a continuation leaves the batch when it ends, so no step is spent on a finished row.
    Example: rows [[5, 6], [7]], n = 2, budgets [4, 4] -> 4 lists, two per row, e.g.
    [[9, 1], [8, 8, 1], [1], [9, 9, 9, 9]] (EOS = 1; the last one ran out of budget).
    """
    device = next(model.parameters()).device
    R = len(rows) * n
    ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)        # positions as generate() counts them: pads at 0
    budget = torch.tensor(budgets, device=device).repeat_interleave(n)              # [R]
    out = torch.full((R, max(budgets, default=0)), tokenizer.pad_token_id, dtype=torch.long)
    length = torch.zeros(R, dtype=torch.long)
    sampler = KeyedSampler(keys, temperature, top_p, top_k)
    live = torch.arange(R, device=device)   # which continuation each batch row is
    # the KV cache's keyword: `cache` in transformers 5.x, `past_key_values` before
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    was_training = model.training           # train mode only under --gradient-checkpointing
    model.eval()
    try:
        step = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                     logits_to_keep=1)                                    # one prefill per row
        cache = getattr(step, cache_kw)
        cache.batch_repeat_interleave(n)
        for layer in getattr(cache, "layers", []):
            _grow_in_place(layer, out.size(1))
        logits = step.logits[:, -1].float().repeat_interleave(n, 0)                   # [R, V]
        mask, pos = mask.repeat_interleave(n, 0), pos[:, -1:].repeat_interleave(n, 0)
        going = budget > 0                           # [b]: rows still writing tokens
        for t in range(out.size(1)):
            tok = sampler.pick(logits, t, live)                                         # [b]
            written = live[going].cpu()
            out[written, t] = tok[going].cpu()
            length[written] += 1
            going &= (tok != tokenizer.eos_token_id) & (budget[live] > t + 1)
            if not going.any():
                break
            if 4 * (~going).sum() >= len(going):     # a quarter has ended: drop those rows from
                idx = going.nonzero().squeeze(1)     # the batch and its cache (a copy, so not
                cache.batch_select_indices(idx)      # at every step)
                live, tok, mask, pos, going = live[idx], tok[idx], mask[idx], pos[idx], going[idx]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
            pos = pos + 1
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                           use_cache=True, **{cache_kw: cache}).logits[:, -1].float()
    finally:
        model.train(was_training)
    return [row[:k] for row, k in zip(out.tolist(), length.tolist())]


def _grow_in_place(layer, room: int) -> None:
    """Let one KV-cache layer grow into preallocated room, without a copy of it per token.

    transformers' DynamicLayer appends each new key and value with torch.cat, which copies the
    layer's whole cache at every step: half of the Monte Carlo's time at --arith-ops 6-8. Here
    update() writes them into a buffer with `room` free positions and keeps `keys` and `values`
    as views of its filled part, so the layer's other methods (length, masks, batch selection)
    work unchanged. After a batch selection replaces `keys`, the next update makes a new buffer.
    A layer of another kind (sliding window, quantized, ...) is left as it is.
    """
    if type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None \
            or layer.keys.dim() != 4:
        return
    buffers, views = [None, None], [None, None]

    def update(key_states, value_states, *args, **kwargs):
        n, new = layer.keys.shape[-2], key_states.shape[-2]
        for i, (old, states) in enumerate([(layer.keys, key_states), (layer.values, value_states)]):
            if old is not views[i] or n + new > buffers[i].shape[-2]:         # a new buffer
                shape = (*old.shape[:-2], n + max(new, room), old.shape[-1])
                buffers[i] = old.new_empty(shape)
                buffers[i][..., :n, :] = old
            buffers[i][..., n:n + new, :] = states
            views[i] = buffers[i][..., :n + new, :]
        layer.keys, layer.values = views
        return layer.keys, layer.values

    layer.update = update


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons) on int64 tensors with values in [0, 2^32)."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m   # int64 products may wrap; the low 32 bits are still right
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


class KeyedSampler:
    """A logits processor that samples row r's t-th new token from a stream keyed by (key_r, t).

        p      = softmax(top_p(top_k(logits / T)))            (the same sampler as do_sample)
        u[v]   = (hash(hash(hash(key_r) ^ t) ^ v) + 0.5) / 2^32,   g[v] = -log(-log u[v])
        token  = argmax_v (log p[v] + g[v])                   (Gumbel-max: an exact sample of p)
                                  (log p = logits' - logsumexp: the argmax of logits' + g)

    It returns 0 at that token and -inf elsewhere, and runs under greedy decoding, which takes
    the argmax. The noise is a pure function of (key, t, v): no generator state is shared
    between rows, so the same key gives the same sample in any batch.
    """

    def __init__(self, keys: list[int], temperature: float, top_p: float, top_k: int):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.keys = torch.tensor([k & 0xFFFFFFFF for k in keys], dtype=torch.long)
        self.warpers = [TemperatureLogitsWarper(temperature)] + \
            ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.start: Optional[int] = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.size(1)
        t = input_ids.size(1) - self.start                                     # new tokens so far
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, self.pick(scores, t)[:, None], 0.0)

    def pick(self, scores: torch.Tensor, t: int,
             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The t-th new token [B] of each row, from logits [B, V]; rows: their keys' indices."""
        for w in self.warpers:  # temperature, top-k, top-p: none of them reads input_ids
            scores = w(None, scores)
        B, V = scores.shape
        keys = self.keys.to(scores.device)
        keys = keys if rows is None else keys[rows]
        row = _hash32(_hash32(keys) ^ t)                                       # [B]
        h = _hash32(row[:, None] ^ torch.arange(V, device=scores.device)[None, :])  # [B, V]
        u = (h.float() + 0.5) / 2.0 ** 32                                     # in (0, 1)
        noisy = scores.float() - torch.log(-torch.log(u))  # log p = scores - logsumexp: same argmax
        return noisy.argmax(-1)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 on tokens up to AND including the first EOS; all ones when there is no EOS.

    Built from the index of the first EOS, never from `ids != pad`: with pad == eos a
    pad-based mask would drop the EOS and the policy would never learn to stop.

    >>> completion_mask_from_ids(torch.tensor([[5, 7, 2, 2, 2], [5, 7, 8, 9, 9],
    ...                                        [2, 2, 2, 2, 2]]), eos_id=2)
    tensor([[1., 1., 1., 0., 0.],
            [1., 1., 1., 1., 1.],
            [1., 0., 0., 0., 0.]])
    """
    is_eos = completion_ids == eos_id                                   # [B, L]
    L = completion_ids.size(1)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1),
                        torch.full_like(is_eos[:, 0], L, dtype=torch.long))
    positions = torch.arange(L, device=completion_ids.device)[None, :]  # [1, L]
    return (positions <= first[:, None]).float()


def decode_completions(tokenizer, completion_ids: torch.Tensor) -> list[str]:
    mask = completion_mask_from_ids(completion_ids, tokenizer.eos_token_id).bool()
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
            for row, m in zip(completion_ids.cpu(), mask.cpu())]


# ----------------------------------------------------------------------------------------
# 2. Verifiers and rewards. Model output is untrusted: bounded, linear-time regexes, no eval
# ----------------------------------------------------------------------------------------

MAX_VERIFY_CHARS = 4096   # only the tail of a completion is read; the answer comes last
MAX_NUMBER_CHARS = 40     # longer digit strings are not numbers we compare
# A number-like token is a maximal run of the characters numbers are written with: digits (any
# script), . , / ^ $ and every minus or dash sign, and e/E between digits ("1e5"). The run is
# read whole or not at all (normalize_number): "3/4", "1e5", ".5", "1,2", "1.2.3" and "−5"
# (U+2212) are not plain numbers, so they never score as 3, 1, 5, 12, 1 or 5.
_MINUS = "\\-\u2010-\u2015\u2212\ufe58\ufe63\uff0d"
_CHARS = rf"[\d.,/^$+{_MINUS}]"
_RUN = rf"(?:{_CHARS}|(?<=\d)[eE](?=[+{_MINUS}]?\d))++"   # possessive: never backtracks
# Every quantifier below is possessive (*+, ++): a run is taken whole and never given back, so
# each pattern costs time linear in the window, whatever the text.
_BOXED = re.compile(r"\\boxed\{\s*+(" + _RUN + ")")
_HASHES = re.compile(r"####\s*+(" + _RUN + ")")
_ANSWER_IS = re.compile(r"answer is[:\s*]*+(" + _RUN + ")", re.IGNORECASE)
_ANY_NUM = re.compile(_RUN)
_LEADING_RUN = re.compile(_RUN)
# A plain number: ASCII digits, an optional leading '-' and '$', commas only between groups of
# exactly three digits, an optional decimal part. "1,000", "$1,000.50", "-3", "0.5" are plain.
_PLAIN = re.compile(r"-?\$?(?:[0-9]{1,3}(?:,[0-9]{3})++|[0-9]++)(?:\.[0-9]++)?+")


def _has_digit(token: str) -> bool:
    return any(c.isdigit() for c in token)


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion, as a number-like token, or None.

    Order: \\boxed{n}, then '#### n', then 'the answer is n', then the last number-like token
    (see _RUN above); the last match of the first kind found wins. A trailing '.' or ','
    (the end of a sentence) is dropped. Only the last MAX_VERIFY_CHARS characters are read,
    so a megabyte of output costs microseconds; a number cut by that window's left edge is
    dropped, never read in part.
    """
    if not isinstance(text, str):
        return None
    start = max(0, len(text) - MAX_VERIFY_CHARS)
    tail = text[start:]
    if start > 0 and _LEADING_RUN.fullmatch(text[start - 1:start + 1]):  # a run across the edge
        tail = tail[_LEADING_RUN.match(tail).end():]
    for pattern in (_BOXED, _HASHES, _ANSWER_IS, _ANY_NUM):
        found = [t for t in pattern.findall(tail) if _has_digit(t)]
        if found:
            return found[-1].rstrip(".,") or None
    return None


def normalize_number(s: Optional[str]) -> Optional[Fraction]:
    """'$1,234.50' -> Fraction(2469, 2); '18.0' -> 18; '18.' -> 18. None unless a plain number.

    Plain (see _PLAIN): ASCII digits, commas between groups of three, an optional decimal part,
    an optional leading '-' and '$'. Not plain, so None: '3/4', '1e5', '.5', '1,2', '−5'.
    """
    if not isinstance(s, str):
        return None
    s = s.strip()
    s = s[:-1] if s.endswith(".") else s
    if not s or len(s) > MAX_NUMBER_CHARS or not _PLAIN.fullmatch(s):
        return None
    return Fraction(s.replace(",", "").replace("$", ""))  # exact decimal, no float rounding


def is_correct(completion: str, gold: str) -> bool:
    pred, ref = normalize_number(extract_answer(completion)), normalize_number(gold)
    return pred is not None and ref is not None and pred == ref


def reward_fn(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 if the final number equals the gold answer, else 0.0 (TRL's reward signature).

    A completion is model output (anything: it scores 0.0 unless it ends in the right number);
    the golds are ours, so a gold that is not a string, or lists of different lengths, raise.
    """
    if len(completions) != len(answers):
        raise ValueError(f"reward_fn: {len(completions)} completions but {len(answers)} gold "
                         "answers; pass one gold answer per completion")
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            raise TypeError(f"reward_fn: gold answer {i} is {type(a).__name__} {a!r}, not a str; "
                            "pass golds as strings like '42'")
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answers)]


def finished_rewards(completions: list[str], answers: list[str], completion_ids: torch.Tensor,
                     eos_id: int) -> torch.Tensor:
    """reward_fn, with 0 for a completion that never emitted EOS (truncated = wrong). [B] float."""
    finished = (completion_ids == eos_id).any(1).float().cpu()
    return torch.tensor(reward_fn(completions, answers), dtype=torch.float32) * finished


def rollout_metrics(rewards: torch.Tensor, completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor, eos_id: int, num_generations: int) -> dict:
    """Reward and length statistics of one rollout batch, with TRL's metric names."""
    r = rewards.float().view(-1, num_generations)
    lengths = completion_mask.sum(1).float().cpu()
    terminated = (completion_ids == eos_id).any(1).cpu()
    return {
        "reward": r.mean().item(), "reward_std": r.std(1).mean().item(),
        "accuracy": (rewards > 0.5).float().mean().item(),
        "frac_reward_zero_std": (r.std(1) < 1e-6).float().mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - terminated.float().mean().item(),
        "completions/mean_terminated_length": (lengths[terminated].mean().item()
                                               if terminated.any() else 0.0),
    }


# ----------------------------------------------------------------------------------------
# 3. Per-token log-probs of the completion tokens, without an fp32 copy of the vocabulary
# ----------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 22  # fp32 elements per chunk of rows (16 MiB): 85 rows of a 49k vocabulary


def _rows_per_chunk(vocab: int, chunk: Optional[int]) -> int:
    return chunk if chunk is not None else max(1, CHUNK_ELEMENTS // vocab)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[y] for each row, fp32, chunked, with a hand-written backward.

    Forward keeps only the logits (already alive, in the model's dtype) and the row
    log-sum-exp (fp32, one number a row). Backward recomputes softmax chunk by chunk, in place:
        d logp / d z = (onehot(y) - softmax(z / T)) / T
    So besides the logits' own gradient (which any method needs), only one fp32 chunk of
    [rows, V] is alive at a time, in forward or backward.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk: int):
        n = logits.size(0)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            z = logits[s:s + chunk].float()
            if temperature != 1.0:
                z = z / temperature
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            picked = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
            logp[s:s + chunk] = picked - lse[s:s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.size(0), chunk):
            z = logits[s:s + chunk].to(torch.float32, copy=True)  # a copy even for fp32: edited
            g = grad_logp[s:s + chunk, None].float()             # [c, 1]
            if T != 1.0:
                z.div_(T)
            z.sub_(lse[s:s + chunk, None]).exp_().mul_(-g)        # -softmax * g
            z.scatter_add_(-1, targets[s:s + chunk, None], g)     # + onehot * g
            if T != 1.0:
                z.div_(T)
            grad[s:s + chunk] = z                                 # cast to the logits' dtype
        return grad, None, None, None


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          chunk: Optional[int] = None) -> torch.Tensor:
    """log softmax(logits / T) gathered at `targets`. logits [..., V], targets [...] -> [...] fp32.

    Equal to `torch.log_softmax(logits.float() / T, -1).gather(-1, targets[..., None])` (tested),
    but peak memory is one chunk of rows in fp32 (CHUNK_ELEMENTS, or `chunk` rows) instead of
    whole [..., V] fp32 tensors (benchmarks/perf/bench_logps.py).
    """
    shape = targets.shape
    flat = logits.reshape(-1, logits.size(-1))
    out = _SelectiveLogSoftmax.apply(flat, targets.reshape(-1), temperature,
                                     _rows_per_chunk(flat.size(-1), chunk))
    return out.view(shape)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0,
                        chunk: Optional[int] = None) -> torch.Tensor:
    """Full-vocabulary entropy of softmax(z / T), chunked, no grad: lse(z) - sum softmax(z) z."""
    flat = logits.reshape(-1, logits.size(-1))
    chunk = _rows_per_chunk(flat.size(-1), chunk)
    out = torch.empty(flat.size(0), dtype=torch.float32, device=logits.device)
    for s in range(0, flat.size(0), chunk):
        z = flat[s:s + chunk].float() / temperature
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        out[s:s + chunk] = (lse.squeeze(-1) - (torch.exp(z - lse) * z).sum(-1))
    return out.view(logits.shape[:-1])


def model_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor) -> dict:
    """input_ids, attention_mask and position_ids [B, P+L] of left-padded prompts followed by
    their completions. Position ids = cumsum(attention_mask) - 1, what generation used."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)                  # [B, P+L]
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)    # [B, P+L]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def per_token_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float,
                    with_entropy: bool = False):
    """Log-probs [B, L] (fp32) of each completion token under `model`, from logits / T.

    Prompts are left-padded, so position ids = cumsum(attention_mask) - 1, which matches what
    generation used. The LM head runs only on the last L+1 positions (logits_to_keep): prompt
    logits are never built. Logit j predicts token j+1, so the final one is dropped.
    Returns (logps, entropies or None).
    """
    L = completion_ids.size(1)
    logits = model(**model_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask),
                   logits_to_keep=L + 1, use_cache=False).logits[:, :-1]         # [B, L, V]
    logps = selective_log_softmax(logits, completion_ids, temperature)         # [B, L]
    entropies = entropy_from_logits(logits, temperature) if with_entropy else None
    return logps, entropies


def response_hidden_states(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor,
                           completion_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, L, H] at the positions that predict each completion token.

    The model body runs without its LM head, so no [B, L, V] logits are built: a caller applies
    the head a chunk of positions at a time (token_dpo.py's full-vocabulary KL and cDPO's score).
    Inputs as per_token_logps (model_inputs). Needs check_plain_lm_head to hold for the model.
    """
    hidden = model.get_decoder()(**model_inputs(prompt_ids, prompt_mask, completion_ids,
                                                completion_mask),
                                 use_cache=False).last_hidden_state             # [B, P+L, H]
    P, L = prompt_ids.size(1), completion_ids.size(1)
    return hidden[:, P - 1:P - 1 + L]                              # hidden j predicts token j+1


def check_plain_lm_head(model, device) -> None:
    """Refuse a model whose logits are not head(last hidden state) (e.g. soft-capped logits):
    response_hidden_states followed by the head would not give its distributions."""
    ids = torch.tensor([[1, 2, 3]], device=device)
    with torch.no_grad():
        full = model(input_ids=ids).logits.float()
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        ours = model.get_output_embeddings()(hidden).float()
    if not torch.allclose(full, ours, rtol=1e-2, atol=1e-2 * max(1.0, full.abs().max().item())):
        raise UserError("this model transforms its logits after the LM head (e.g. soft-capping), "
                        "which token_dpo.py does not reproduce; pass --model with a plain causal "
                        "LM (Llama, Qwen, ...)")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """sum(values * mask) / sum(mask), as a float: a per-token metric over the real tokens."""
    return ((values * mask).sum() / mask.sum()).item()


@torch.no_grad()
def no_grad_pass(fwd, mbs: list, policy=None, reference=None):
    """Step 2 of every RL loop: one no-grad pass for what the update needs before it starts.

    fwd(model, mb, with_entropy) -> (log-probs [b, L], entropies [b, L] or None) of the rows mb;
    mbs: the micro-batches covering the batch. Runs `policy` (log-probs AND entropies) and
    `reference` (log-probs) if given; a model not given costs nothing. Returns (policy log-probs,
    policy entropies, reference log-probs), each [B, L] in mbs order, or None.
    The old log-probs need no pass here when nothing reads them before the update: the first
    optimisation pass runs on the weights that sampled the batch, so its log-probs, detached,
    ARE the old ones (ratio exactly 1), and that saves a forward.
    """
    logps = entropies = ref_logps = None
    if reference is not None:
        ref_logps = torch.cat([fwd(reference, mb)[0] for mb in mbs])
    if policy is not None:
        outs = [fwd(policy, mb, True) for mb in mbs]
        logps, entropies = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return logps, entropies, ref_logps


# ----------------------------------------------------------------------------------------
# 4. The update: metrics averaged over micro-batches and passes, the clipped optimizer step
# ----------------------------------------------------------------------------------------


class MetricAverager:
    """Averages metrics over a whole update (every micro-batch and pass), weighted by tokens.

    `approx_kl_old` is averaged over the last pass only: it says how far the passes moved.
    """
    LAST_PASS_ONLY = ("approx_kl_old",)
    SUMMED = ("policy_loss",)  # each micro-batch holds a part of the loss: sum, then pass mean

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.skipped_updates = 0
        self.passes = 0  # counted by optimizer_step

    def add(self, metrics: dict, weight: float, last_pass: bool = True) -> None:
        for k, v in metrics.items():
            if k in self.LAST_PASS_ONLY and not last_pass:
                continue
            w = 1.0 if k in self.SUMMED else weight
            self.sums[k] = self.sums.get(k, 0.0) + v * w
            self.weights[k] = self.weights.get(k, 0.0) + w

    def means(self) -> dict:
        out = {k: self.sums[k] / (max(self.passes, 1) if k in self.SUMMED
                                  else max(self.weights[k], 1e-12)) for k in self.sums}
        out["skipped_updates"] = self.skipped_updates
        out["num_updates"] = self.passes
        return out


def optimizer_step(model, optimizer, max_grad_norm: float, avg: MetricAverager) -> float:
    """Clip the gradient norm and step. A non-finite gradient skips the update (and is counted)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    avg.passes += 1
    if math.isfinite(grad_norm):
        optimizer.step()
    else:
        avg.skipped_updates += 1
        print(f"warning: non-finite gradient norm ({grad_norm}); update skipped", file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------------------
# 5. Evaluation: greedy, on a fixed held-out set
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[dict], task: str, max_new_tokens: int,
             batch_size: int = 64, return_completions: bool = False):
    """Greedy pass@1 accuracy on `examples` (and the completions, if asked)."""
    device = next(model.parameters()).device
    correct, texts = 0, []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        rows = [tokenizer(format_prompt(tokenizer, ex["question"], task),
                          add_special_tokens=False)["input_ids"] for ex in chunk]
        ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
        out = generate(model, tokenizer, ids, mask, max_new_tokens, greedy=True)
        decoded = decode_completions(tokenizer, out)
        correct += sum(reward_fn(decoded, [ex["answer"] for ex in chunk]))
        texts += decoded
    acc = correct / max(len(examples), 1)
    return (acc, texts) if return_completions else acc


# ----------------------------------------------------------------------------------------
# 6. Tasks. An example is {"id": int, "question": str, "answer": str (the gold number)}.
# ----------------------------------------------------------------------------------------

ARITH_TRAIN_SIZE = 1000  # the RL prompts: a fixed set, revisited across epochs (DCPO's statistics)
ARITH_TEST_SIZE = 500    # held-out, never trained on
ARITH_SFT_SIZE = 10000   # the warm start's own problems (disjoint from both)
SYSTEM_PROMPT = ("Solve the problem step by step. "
                 "End your answer with a line of the form '#### <number>'.")


ARITH_OPS = (2, 4)  # operations per problem: the default length of the embedded task
ARITH_MAX_OPS = 32  # the longest setting --arith-ops accepts


def parse_arith_ops(text: str) -> tuple[int, int]:
    """'2-4' -> (2, 4); '6' -> (6, 6). Refuses anything else with a UserError naming the fix.

    LO >= 2: one operation gives fewer distinct problems than the three splits need.
    """
    m = re.fullmatch(r"\s*(\d{1,3})\s*(?:-\s*(\d{1,3})\s*)?", str(text))
    lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
    if not 2 <= lo <= hi <= ARITH_MAX_OPS:
        raise UserError(f"--arith-ops {text!r} is not a range of operations LO-HI with "
                        f"2 <= LO <= HI <= {ARITH_MAX_OPS}; pass e.g. --arith-ops 2-4 or 6-8")
    return lo, hi


def arith_completion_length(ops: tuple[int, int]) -> int:
    """The default max completion length of a setting: 9 * HI + 12 tokens (48 for 2-4, 84 for 6-8).

    A step is at most 9 characters with its space ('99-30=69 '), the answer ' #### 69' and EOS
    8 more (the last step has no space), so the longest solution of HI steps is 9 * HI + 7 + 1
    tokens; the rule adds 4 of slack. The tiny model reads one token per character.
    """
    return 9 * ops[1] + 12


def arith_problem(rng: random.Random, ops: tuple[int, int] = ARITH_OPS) -> tuple[str, str, str]:
    """One multi-step integer arithmetic problem with its chain-of-thought solution.

    ops[0] to ops[1] additions/subtractions (2 to 4 by default) of numbers in 1..30, every
    intermediate result in 0..99. Each step of the solution can go wrong on its own (a carry,
    a borrow, a copied number), so there is room for credit assignment; more operations mean
    a longer chain of steps before the answer.

    >>> arith_problem(random.Random(0))
    ('25+29-2-17', '25+29=54 54-2=52 52-17=35 #### 35', '35')
    """
    n_steps = rng.randint(*ops)
    cur = rng.randint(1, 30)
    question, steps = str(cur), []
    for _ in range(n_steps):
        b = rng.randint(1, 30)
        op = rng.choice("+-")
        if op == "-" and b > cur:
            op = "+"
        if op == "+" and cur + b > 99:
            op = "-"
        new = cur + b if op == "+" else cur - b
        question += f"{op}{b}"
        steps.append(f"{cur}{op}{b}={new}")
        cur = new
    return question, " ".join(steps) + f" #### {cur}", str(cur)


def arith_dataset(split: str, seed: int = 1234, ops: tuple[int, int] = ARITH_OPS) -> list[dict]:
    """The embedded task: a fixed list of problems per split ("test", "train", "sft").

    The splits are disjoint by question text, so no held-out question is ever trained on.
    `seed` is the task's own seed (not the run's): every run and machine sees the same sets.
    `ops` is the length setting (see arith_problem); the default gives the original sets.
    """
    sizes = {"test": ARITH_TEST_SIZE, "train": ARITH_TRAIN_SIZE, "sft": ARITH_SFT_SIZE}
    rng = random.Random(seed)
    seen: dict[str, dict] = {}
    while len(seen) < sum(sizes.values()):
        q, solution, ans = arith_problem(rng, ops)
        if q not in seen:
            seen[q] = {"question": q, "solution": solution, "answer": ans}
    items, start = list(seen.values()), 0
    for name, size in sizes.items():
        if name == split:
            return [dict(id=i, **ex) for i, ex in enumerate(items[start:start + size])]
        start += size
    raise ValueError(f"unknown split {split!r}")


HUB = "hub"  # --data-dir hub: GSM8K from the Hugging Face hub, through the optional `datasets`
HUB_NEEDS_DATASETS = ("--data-dir hub needs the `datasets` package; `pip install datasets`, "
                      "or pass --data-dir DIR holding train.jsonl and test.jsonl")


def gsm8k_dir(data_dir: Optional[str]) -> Path:
    default = Path(__file__).resolve().parent.parent / "shared/data/gsm8k"
    return Path(data_dir) if data_dir else default


def gsm8k_missing(path: Path) -> str:
    return (f"GSM8K file {path} not found; pass --data-dir DIR holding {path.name} (from "
            "github.com/openai/grade-school-math), or --data-dir hub to download GSM8K "
            "with `datasets`")


def load_gsm8k(split: str, data_dir: Optional[str]) -> list[dict]:
    """GSM8K in the official JSONL format ({"question", "answer": "...#### 42"}).

    Reads `data_dir`/{split}.jsonl (default: ../shared/data/gsm8k beside the project). The hub
    is used only when asked for, with `--data-dir hub` (needs the optional `datasets` package).
    """
    if data_dir == HUB:
        try:
            import datasets  # optional dependency
        except ImportError:
            raise UserError(HUB_NEEDS_DATASETS) from None
        ds = datasets.load_dataset("openai/gsm8k", "main", split=split)
        return [dict(id=i, question=r["question"], solution=r["answer"],
                     answer=gsm8k_gold(r["answer"], f"hub gsm8k {split}:{i + 1}"))
                for i, r in enumerate(ds)]
    path = gsm8k_dir(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(gsm8k_missing(path))
    return read_gsm8k_jsonl(path)


def gold_from_gsm8k(answer_field: str) -> str:
    return answer_field.split("####")[-1].strip().replace(",", "")


def gsm8k_gold(answer_field: str, where: str) -> str:
    """The gold number after '####', or UserError naming the record if it is not a plain number."""
    gold = gold_from_gsm8k(answer_field)
    if normalize_number(gold) is None:
        raise UserError(f"{where}: the gold answer after '####' is {gold[:40]!r}, not a number; "
                        "fix the record (e.g. '#### 42'), drop the line, "
                        "or pass --data-dir another folder")
    return gold


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a bad byte


def check_utf8(line: str, where: str, flag: str) -> None:
    """UserError naming file:line if `line` (read with errors="surrogateescape") had bad UTF-8."""
    bad = _NOT_UTF8.search(line)
    if bad:
        byte = ord(bad.group()) - 0xDC00
        raise UserError(f"{where} is not valid UTF-8 (byte {byte:#04x} at column "
                        f"{bad.start() + 1}); save the file as UTF-8, or pass {flag} another")


def read_gsm8k_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        lines = [(n, line) for n, line in enumerate(fh, 1) if line.strip()]
    for lineno, line in lines:
        check_utf8(line, f"{path}:{lineno}", "--data-dir")
        try:
            row = json.loads(line)
            q, a = row["question"], row["answer"]
            if not isinstance(q, str) or not isinstance(a, str) or "####" not in a:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{lineno} is not a GSM8K record; each line must be JSON "
                            'like {"question": "...", "answer": "... #### 42"} '
                            "(or pass --data-dir another folder)") from None
        gold = gsm8k_gold(a, f"{path}:{lineno}")
        out.append(dict(id=len(out), question=q, answer=gold, solution=a))
    if not out:
        raise UserError(f"{path} holds no examples; point --data-dir at a folder with a non-empty "
                        f"{path.name}")
    return out


def load_task(task: str, split: str, data_dir: Optional[str] = None,
              arith_ops: str = "2-4") -> list[dict]:
    if task == "arith":
        return arith_dataset(split, ops=parse_arith_ops(arith_ops))
    if task == "gsm8k":
        return load_gsm8k(split, data_dir)
    raise UserError(f"unknown --task {task!r}; use arith or gsm8k")


def default_max_len(task: str, arith_ops: str = "2-4") -> int:
    """--max-completion-length when it is not given: arith_completion_length, or 512 for gsm8k."""
    return arith_completion_length(parse_arith_ops(arith_ops)) if task == "arith" else 512


def format_prompt(tokenizer, question: str, task: str) -> str:
    """Instruct models get their chat template; base models (and the tiny model) a plain prompt."""
    if task == "arith" and getattr(tokenizer, "chat_template", None) is None:
        return f"Q:{question}\nA:"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer: Let's think step by step."


# ----------------------------------------------------------------------------------------
# 7. Preference pairs (token_dpo.py): a JSONL file of pairs, tokenised, batched
# ----------------------------------------------------------------------------------------

# A pair of token ids is {"prompt": [int], "chosen": [int], "rejected": [int]}; each response
# ends with its EOS, as a finished answer does.

def read_preference_jsonl(path: str) -> list[dict]:
    """Rows {"prompt": str, "chosen": str, "rejected": str} of a JSONL file (extra keys ignored).

    Any bad line raises UserError with one line "<path>:<line>: <problem>; <fix>".
    """
    fields = ('each line must be a JSON object with non-empty string fields "prompt", '
              '"chosen" and "rejected"')
    if not Path(path).is_file():
        raise UserError(f"--pairs-file {path} does not exist; pass a JSONL file, one pair per "
                        f"line ({fields})")
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            check_utf8(line, f"{path}:{lineno}", "--pairs-file")  # one line, no traceback
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); {fields}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(row).__name__}; {fields}")
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    problem = "missing" if key not in row else "not a non-empty string"
                    raise UserError(f"{path}:{lineno}: '{key}' is {problem}; {fields}")
            if row["chosen"] == row["rejected"]:
                raise UserError(f"{path}:{lineno}: 'chosen' equals 'rejected', which carries no "
                                "preference; drop the line or fix one answer")
            rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    if not rows:
        raise UserError(f"{path} holds no pairs; {fields}")
    return rows


def tokenize_pairs(rows: list[dict], tokenizer, task: str, context: Optional[int]) -> list[dict]:
    """Text pairs -> token-id pairs. The prompt is formatted like the task's prompts; a response
    is tokenised on its own (no merge across the boundary) and ends with EOS."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = []
    for i, r in enumerate(rows, 1):
        prompt = ids(format_prompt(tokenizer, r["prompt"], task))
        chosen, rejected = (ids(r[k]) + [tokenizer.eos_token_id] for k in ("chosen", "rejected"))
        n = len(prompt) + max(len(chosen), len(rejected))
        if context is not None and n > context:
            raise UserError(f"pair {i} of --pairs-file has {n} tokens, more than the model's "
                            f"context of {context}; shorten it or drop it")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5,6],[7]] -> ids [[5,6],[7,pad]], mask [[1,1],[1,0]] (float, from the lengths: a pad
    id inside a row is still a token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    return ids.to(device), mask.to(device)


def collate_pairs(pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """N pairs -> one batch of 2N sequences, [chosen_1..chosen_N; rejected_1..rejected_N]:
    prompt ids/mask [2N, P] (left-padded), completion ids/mask [2N, L] (right-padded)."""
    prompt_ids, prompt_mask = left_pad([p["prompt"] for p in pairs] * 2, pad_id, device)
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    completion_ids, completion_mask = right_pad(responses, pad_id, device)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


# ----------------------------------------------------------------------------------------
# 8. Models: any Hugging Face causal LM and the embedded tiny model, loaded the same way
# ----------------------------------------------------------------------------------------

TINY = "tiny"  # the --model value that selects the embedded model (section 13 builds it)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. CPU runs are then deterministic; GPU kernels may not be."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is the GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype, the COMPUTE dtype: "auto" is bf16 on a GPU with bf16 units (Ampere or newer),
    else fp32 (a CPU without bf16 instructions only emulates it, slower than fp32)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """`with autocast():` runs the model calls inside it in `dtype`, on fp32 master weights.

    Mixed precision the standard way (torch.autocast, as TRL and nanoGPT do): the policy's
    weights, gradients and AdamW state stay fp32, so an update of lr * ~1 = 1e-6 is kept (a bf16
    weight near 0.02 moves in steps of 1.2e-4, so a bf16 copy would round it away), while the
    matrix products run in bf16. Log-probs are still taken in fp32 (selective_log_softmax).
    Within one region autocast casts each fp32 weight once and reuses the copy, so decoding
    reads bf16 weights; the copies are dropped when the region ends. Hence: never step an
    optimizer inside a region, and run backward outside it, as PyTorch advises.
    fp32 gives a context that does nothing. Returns a function that makes a fresh context.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def load_model_and_tokenizer(name: str, device: torch.device, dtype: torch.dtype,
                             arith_ops: str = "2-4"):
    """Load any causal LM the same way: AutoModelForCausalLM.from_pretrained(path).

    `name == "tiny"` warm-starts (or loads from cache) the embedded model first, for the length
    setting `arith_ops` (each setting has its own warm start). Tokenizers
    pad on the left for generation; a tokenizer with no pad token pads with EOS.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if name == TINY:
        name = str(ensure_tiny_model(seed=0, ops=parse_arith_ops(arith_ops)))
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise UserError(f"model folder {name} does not exist; pass --model with a Hugging Face id "
                        "or a folder made by save_pretrained (or --model tiny for the embedded "
                        "model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {name!r} ({first}); pass --model with a local "
                        "folder made by save_pretrained, or a hub id that is downloaded or "
                        "reachable") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {name!r} has no EOS token; the completion mask needs one")
    model.to(device)
    model.eval()  # no dropout, ever: else ratio != 1 on the first pass and the clip fires on noise
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def quiet_transformers() -> None:
    """Hide transformers' own progress bars ("Loading weights", "Writing model shards"), so that
    a run shows one bar, its own (progress). The hub's download bars stay: a first download of
    a model can take minutes. Older transformers, without set_tqdm_hook, lose those too."""
    from transformers.utils import logging as hf_logging

    def no_bar(make_bar, args, kwargs):  # the bar's iterable still runs; nothing is drawn
        return make_bar(*args, **dict(kwargs, disable=True))

    if hasattr(hf_logging, "set_tqdm_hook"):
        hf_logging.set_tqdm_hook(no_bar)
    else:
        hf_logging.disable_progress_bar()


def load_frozen(name: str, device: torch.device, dtype: torch.dtype, arith_ops: str = "2-4"):
    """A model that never trains (a reference, a guidance model): loaded as above, no gradients."""
    model, _ = load_model_and_tokenizer(name, device, dtype, arith_ops)
    return model.requires_grad_(False)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations during backward instead of storing them.

    For bigger models (docs/grpo.md, implementation item 5): activation memory drops from one copy
    per layer to one layer's, for about one extra forward of compute. Transformers checkpoints
    only in train mode, so the model goes to train mode with every dropout set to 0 (the first
    pass must still see ratio == 1); common.generate switches to eval mode to keep the KV cache.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer (transformers >= 5)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    model.train()


def context_length(model) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


# ----------------------------------------------------------------------------------------
# 9. CLI: a dataclass is the single source of truth for every knob; run_main runs a script
# ----------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but its own errors (`--dtype fp8`, `--total-steps two`) are one line, no usage,
    and a mistyped flag gets the nearest real one (`--totalsteps`: did you mean --total-steps?)."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message}; see {self.prog} --help")

    def parse_args(self, args=None, namespace=None):
        ns, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._did_you_mean(unknown)}")
        return ns

    def _did_you_mean(self, unknown: list[str]) -> str:
        """' (did you mean --total-steps?)' for the unknown flags that are close to a known one."""
        known = [s for action in self._actions for s in action.option_strings]
        guesses = []
        for arg in unknown:
            flag = arg.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1) if flag.startswith("-") else []
            if close:
                guesses.append((flag, close[0]))
        if len(guesses) == 1:
            return f" (did you mean {guesses[0][1]}?)"
        return (" (did you mean " + ", ".join(f"{guess} for {flag}" for flag, guess in guesses)
                + "?)") if guesses else ""


def _parser(args_cls, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    doc = (args_cls.__doc__ or "").strip()
    try:
        prog = Path(inspect.getfile(args_cls)).name  # grpo.py, also when called from a test
    except (TypeError, OSError):
        prog = None
    parser = _OneLineParser(prog=prog, description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            argument_default=argparse.SUPPRESS if suppress_defaults else None)
    hints = typing.get_type_hints(args_cls)
    for f in dataclasses.fields(args_cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        rng = f.metadata.get("range")
        rng = f"; {rng.replace('SEED_MAX', str(SEED_MAX))}" if rng and rng[0] in "<>[(" else ""
        kwargs: dict[str, Any] = dict(help=f"{help_text} ({_help_default(f)}{rng})")
        if not suppress_defaults:
            kwargs["default"] = f.default
        origin = typing.get_origin(tp)
        if origin is typing.Union:  # Optional[X]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0]
            origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            choices = list(typing.get_args(tp))
            kwargs.update(type=type(choices[0]), choices=choices)
        else:
            kwargs["type"] = tp
        parser.add_argument(flag, dest=f.name, **kwargs)
    return parser


def _help_default(f: dataclasses.Field) -> str:
    """The default a help line shows: the field's, but for --data-dir (None) the folder read."""
    if f.default is None and f.metadata.get("range") == "data_dir":
        return f"default: {_short_path(gsm8k_dir(None))}"
    return f"default: {f.default}"


def _short_path(path: Path) -> str:
    """A path as the shorter of its absolute form and its form relative to the current folder."""
    try:
        return min(os.path.relpath(path), str(path), key=len)
    except ValueError:  # on another drive (Windows)
        return str(path)


def parse_args(args_cls, argv: Optional[list[str]] = None):
    """Build an argparse parser from a dataclass and parse argv into an instance of it.

    Each field becomes a kebab-case flag (`num_generations` -> `--num-generations`). Its help
    line is the field's `metadata["help"]`, followed by the default and its range. `bool`
    fields get `--flag/--no-flag`; `Literal[...]` fields get `choices`. Every argparse error
    (an unknown choice, `--total-steps two`) is one line and exit code 2.

    The instance also carries `given`: the names of the fields given on the command line, so
    that `--resume` can tell a flag given again from a default.
    """
    ns = _parser(args_cls).parse_args(argv)
    given = set(vars(_parser(args_cls, suppress_defaults=True).parse_args(argv)))
    args = args_cls(**vars(ns))
    args.given = frozenset(given)  # not a field: config.json and dataclasses.asdict never see it
    return args


def run_main(main, args_cls, argv: Optional[list[str]] = None):
    """Parse and check the CLI, run `main`; every error a user can fix is one line.

    Before any work: argparse (one line), the run's own config.json on --resume (resume_args),
    then every field against its range (check_args). Exit codes: 2 bad input, 3 diverged,
    128 + the signal (130 SIGINT, 143 SIGTERM) for an interrupted run, whose summary.json
    says "status": "interrupted".
    """
    import signal

    args = parse_args(args_cls, argv)
    algo = Path(inspect.getfile(main)).stem
    try:
        if getattr(args, "resume", None):  # integrations/train_trl.py has no --resume
            args = resume_args(args, algo)
        check_args(args, algo)
        result = main(args)
    except UserError as e:
        fail(str(e))
    except TrainingDiverged as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Interrupted as e:
        print(f"stopped: {e.args[1]}", file=sys.stderr, flush=True)
        sys.exit(128 + e.args[0])
    except KeyboardInterrupt:  # before the run had its signal handlers: no checkpoint was written
        print("stopped: SIGINT before training started; nothing to resume", file=sys.stderr,
              flush=True)
        sys.exit(128 + signal.SIGINT)
    if isinstance(result, dict) and result.get("status") == "interrupted":
        sys.exit(128 + signal.Signals[result["signal"]])
    return result


# ----------------------------------------------------------------------------------------
# 10. Errors a user can fix: one line, exit code 2, never a traceback from inside torch
# ----------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input that the user can fix. Scripts turn it into one line and exit code 2."""


class TrainingDiverged(Exception):
    """Too many steps in a row with a non-finite loss or gradient. Exit code 3, one line."""


class Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once. The last complete checkpoint stays as it was.

    args: (signal number, the one line to print). A KeyboardInterrupt, so no `except Exception`
    on the way up can swallow it.
    """


def fail(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be positive, got {value}; pass e.g. {flag} 1")


# The range of a field is its metadata["range"], beside its help text. Numbers: ">0", ">=0",
# ">=2", "[0, 1]", "(0, 1]" (a None default means "computed", and is not checked). Other
# fields name the check of what they hold: "device", "model", "output_dir", "data_dir",
# "run_dir", "file", "arith_ops" ("LO-HI"), "int_list>0" (comma-separated positive integers)
# or "any".
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
_INTERVAL = re.compile(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])")
_BOUND = re.compile(r"(>=|>|<=|<)\s*(\S+)")


def _in_range(value: float, rng: str) -> bool:
    m = _INTERVAL.fullmatch(rng)
    if m:
        lo, hi = _bound(m[2]), _bound(m[3])
        above = (lo <= value) if m[1] == "[" else (lo < value)
        return above and ((value <= hi) if m[4] == "]" else (value < hi))
    m = _BOUND.fullmatch(rng)
    if not m:
        raise ValueError(f"unknown range {rng!r}")
    bound = _bound(m[2])
    ops = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}
    return ops[m[1]]


def _bound(text: str) -> float:
    """A bound of a range: a number, "inf", or "SEED_MAX"."""
    return float(SEED_MAX) if text == "SEED_MAX" else float(text)


def _range_words(rng: str, flag: str) -> str:
    if rng == ">0":
        return f"{flag} must be positive"
    m = _BOUND.fullmatch(rng)
    if m:
        words = {">=": "at least", ">": "greater than", "<=": "at most", "<": "less than"}[m[1]]
        return f"{flag} must be {words} {m[2]}"
    return f"{flag} is outside {rng.replace('SEED_MAX', str(SEED_MAX))}"


def _fix(flag: str, rng: str, default) -> str:
    """What to pass instead: the default, or (a computed default) leaving the flag out."""
    return f"pass e.g. {flag} {default}" if default is not None else f"drop {flag} for its default"


def check_device(name: str) -> None:
    flag = "--device"
    if name in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?|mps", name)
    if not m:
        raise UserError(f"{flag} {name!r} is not a device; pass {flag} auto, cpu, cuda or cuda:N")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{flag} mps: no Apple GPU is available; pass {flag} cpu (or auto)")
        return
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: no CUDA GPU is visible on this machine; "
                        f"pass {flag} cpu (or auto)")
    if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"numbered from 0; pass {flag} cuda:0")


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """The folder exists or can be made, and a run folder can be written in it (probed, removed)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass {flag} a folder "
                        "(it is created if missing)")
    anchor = p
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"{flag} {path}: {anchor} is a file, not a folder; pass {flag} a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".write-probe-", dir=anchor)
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {anchor} ({e.strerror}); "
                        f"pass {flag} a folder you can write to") from None


def check_weights_file(path: Path) -> Optional[str]:
    """Why a weights file is not whole, or None. A .safetensors header promises a size; a torch
    .bin (a zip since torch 1.6) ends with the zip's directory."""
    if path.suffix == ".bin":
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if is_zip and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated ({path.stat().st_size} bytes, no zip directory)"
        return None
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        end = max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    if size < 8 + n + end:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


def check_model(name: Optional[str], flag: str = "--model") -> None:
    """A local model folder exists and its safetensors weights are whole (before any load)."""
    if name is None or name == TINY:
        return
    p = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not p.exists():
        raise UserError(f"model folder {name} does not exist; pass {flag} with a Hugging Face id "
                        "or a folder made by save_pretrained "
                        "(or --model tiny for the embedded model)")
    if p.is_dir():
        for weights in sorted([*p.glob("*.safetensors"), *p.glob("*.bin")]):
            problem = check_weights_file(weights)
            if problem:
                raise UserError(f"{flag} {name}: {problem}; copy or save the model again "
                                "(save_pretrained), or pass another folder")


def check_data_dir(data_dir: Optional[str], task: str) -> None:
    """--data-dir hub has `datasets`; a folder exists (load_gsm8k reads and checks its files)."""
    if task != "gsm8k":
        return
    if data_dir == HUB:
        try:
            import datasets  # noqa: F401  (optional dependency)
        except ImportError:
            raise UserError(HUB_NEEDS_DATASETS) from None
        return
    d = gsm8k_dir(data_dir)
    if not d.is_dir():
        raise UserError(f"GSM8K folder {d} not found; pass --data-dir DIR holding train.jsonl and "
                        "test.jsonl (from github.com/openai/grade-school-math), or --data-dir hub")


def check_args(args, algo: str) -> None:
    """Every field of `args` against its range (metadata["range"]), before any work, then the
    combinations its class checks (an Args.check() method, if it has one).

    Raises UserError with one line naming the flag and a value that works.
    """
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value, rng = getattr(args, f.name), f.metadata.get("range")
        flag = "--" + f.name.replace("_", "-")
        if rng is None or value is None or rng == "any":
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}; "
                                f"{_fix(flag, rng, f.default)}")
            if not _in_range(value, rng):
                raise UserError(f"{_range_words(rng, flag)}, got {value}; "
                                f"{_fix(flag, rng, f.default)}")
        elif rng == "device":
            check_device(value)
        elif rng == "model":
            check_model(value, flag)
        elif rng == "output_dir":
            if not getattr(args, "resume", None):
                check_output_dir(value, flag)
        elif rng == "data_dir":
            check_data_dir(value, getattr(args, "task", "gsm8k"))
        elif rng == "run_dir":
            check_run_dir(value, algo)
        elif rng == "file":
            if not Path(value).is_file():
                raise UserError(f"{flag} {value} does not exist (or is not a file); "
                                "pass an existing file")
        elif rng == "arith_ops":
            parse_arith_ops(value)
        elif rng == "dtype":
            if value == "float16":
                raise UserError(f"{flag} float16 needs loss scaling, which these scripts leave "
                                f"out (bf16 needs none); pass {flag} bfloat16 on a GPU that has "
                                f"it (Ampere or newer), else {flag} float32")
        elif rng == "int_list>0":
            parts = value.split(",")
            if not all(re.fullmatch(r"\s*[0-9]+\s*", b) and int(b) > 0 for b in parts):
                raise UserError(f"{flag} must be positive integers separated by commas, "
                                f"got {value!r}; pass e.g. {flag} {f.default}")
        else:
            raise ValueError(f"field {f.name} of {type(args).__name__}: unknown range {rng!r} "
                             f"({hints[f.name]})")
    check_tiny_task(args)
    if hasattr(args, "check"):  # a script's checks of flag combinations (grpo.py's D3S)
        args.check()


def check_tiny_task(args) -> None:
    """The embedded tiny model only for --task arith: it was warm-started on arithmetic alone, and
    it reads one token per character, so GSM8K's prompts do not fit its context."""
    if getattr(args, "model", None) == TINY and getattr(args, "task", None) == "gsm8k":
        raise UserError("--task gsm8k needs --model: the embedded tiny model (--model tiny, the "
                        "default) is for --task arith (trained on arithmetic only, and GSM8K's "
                        "prompts do not fit its context); pass --model for gsm8k, e.g. "
                        "--model Qwen/Qwen2.5-0.5B-Instruct")


# ----------------------------------------------------------------------------------------
# 11. Runs: folder, config, metrics.jsonl, sample completions, atomic checkpoints, prompt order
# ----------------------------------------------------------------------------------------


def make_run_dir(output_dir: str, algo: str, model: str, task: str, seed: int) -> Path:
    short = Path(model.rstrip("/")).name or model
    path = Path(output_dir) / f"{algo}__{short}__{task}__{seed}__{int(time.time())}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLogger:
    """Writes config.json once, then one JSON line per step to metrics.jsonl (flushed)."""

    def __init__(self, run_dir: Path, config: dict, append: bool = False):
        self.run_dir = Path(run_dir)
        if not append:
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.metrics = open(self.run_dir / "metrics.jsonl", "a" if append else "w")
        self.samples = open(self.run_dir / "completions.jsonl", "a" if append else "w")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def log_completions(self, step: int, prompts: list[str], completions: list[str],
                        rewards: list[float]) -> None:
        for p, c, r in zip(prompts, completions, rewards):
            row = {"step": step, "prompt": p, "completion": c, "reward": r}
            self.samples.write(json.dumps(row) + "\n")
        self.samples.flush()

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


class PromptSampler:
    """Epochs over a fixed list of examples, each epoch in a fresh seeded order.

    Its whole state is (epoch, position), so a resumed run draws the same prompts.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            take = min(k - len(out), self.n - self.pos)
            out += self._order[self.pos:self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary one and a rename: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write run_dir/checkpoints/step-N atomically: a temporary folder, then one rename.

    The folder loads with AutoModelForCausalLM.from_pretrained. trainer_state.pt holds the
    optimizer, RNG states, the step, the prompt position and the method's own state. A
    checkpoint containing a non-finite parameter is refused, so a NaN never replaces a good one.
    COMPLETE, written last, holds the step and the sha256 of every file: a file truncated or
    changed later is caught on --resume (verify_checkpoint), and the run falls back a checkpoint.
    """
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("refusing to checkpoint a model with non-finite parameters")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(dict(trainer_state, step=step, rng=rng_state()), tmp / "trainer_state.pt")
    hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "COMPLETE").write_text(json.dumps({"step": step, "sha256": hashes}, indent=1))
    if final.exists():
        _remove_checkpoint(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        _remove_checkpoint(old)
    return final


def _remove_checkpoint(ckpt: Path) -> None:
    """Rename, then delete: a kill in between leaves a hidden folder, not a half-deleted step-N."""
    gone = ckpt.with_name(f".old-{ckpt.name}-{os.getpid()}")
    os.replace(ckpt, gone)
    shutil.rmtree(gone, ignore_errors=True)


def verify_checkpoint(ckpt: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from (partial, truncated, changed), or None."""
    try:
        marker = json.loads((ckpt / "COMPLETE").read_text())
    except FileNotFoundError:
        return "partial: no COMPLETE marker"
    except (OSError, ValueError):
        return "its COMPLETE marker is unreadable"
    if not (ckpt / "trainer_state.pt").is_file():
        return "no trainer_state.pt"
    hashes = marker.get("sha256", {}) if isinstance(marker, dict) else {}  # older checkpoints: none
    for name, digest in hashes.items():
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        if sha256_file(ckpt / name) != digest:
            return f"{name} does not match the sha256 written at save time (truncated or changed)"
    for weights in sorted(ckpt.glob("*.safetensors")):
        problem = check_weights_file(weights)
        if problem:
            return problem
    return None


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"), reverse=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint of a run that verifies, skipping the others (with a note each)."""
    if not (Path(run_dir) / "config.json").exists():
        raise UserError(f"{run_dir} is not a run folder (no config.json); pass --resume a folder "
                        "under runs/")
    for ckpt in checkpoints_newest_first(run_dir):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        print(f"note: skipping checkpoint {ckpt} ({problem})", file=sys.stderr)
    return None


def trim_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a log whose step is <= `step`; drop a half-written (unparsable) line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # cut off by a kill: the step it belonged to is run again
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    write_atomic(path, "".join(l + "\n" for l in keep))


# Flags that a resumed run may change (how long, how often it logs, where it runs); every other
# flag is the run's own, read from its config.json, and giving it again with another value is
# refused. Each resume is recorded in config.json under "resumed", with what changed.
RESUME_MAY_CHANGE = ("total_steps", "eval_every", "save_every", "log_completions_every",
                     "output_dir", "resume", "device", "max_bad_steps", "show_credit",
                     "gradient_checkpointing")


def check_run_dir(path: str, algo: str) -> dict:
    """The config.json of a run folder made by `algo`, or UserError."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} is not a run folder (no config.json); "
                        "pass --resume a folder under runs/")
    try:
        config = json.loads(config_path.read_text())
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError):
        raise UserError(f"--resume {path}: its config.json is unreadable; pass --resume a run "
                        "folder made by this script, or start a new run") from None
    if config.get("algo") != algo:
        raise UserError(f"--resume {path} is a run of {config.get('algo')}.py, not {algo}.py; "
                        f"resume it with {config.get('algo')}.py")
    return config


def resume_args(args, algo: str):
    """The Args of the run being resumed: its config.json, plus the flags that may change.

    A flag given on the command line (args.given) with a value other than the run's is refused
    unless it is in RESUME_MAY_CHANGE; those are kept in args.resume_changes as {name: [old, new]}.
    """
    config = check_run_dir(args.resume, algo)
    names = [f.name for f in dataclasses.fields(args) if f.init]
    unknown = sorted(set(config) - set(names) - {"algo", "resumed"})
    if unknown:  # a flag renamed or dropped since the run began: never resume it with a default
        flags = ", ".join("--" + n.replace("_", "-") for n in unknown)
        raise UserError(f"--resume {args.resume}: its config.json has {flags}, which this "
                        f"{algo}.py does not know (made by another version); start a new run")
    values = {n: config[n] for n in names if n in config}
    changed = {}
    for name in sorted(getattr(args, "given", ())):
        new = getattr(args, name)
        if name == "resume" or values.get(name, new) == new:
            values.setdefault(name, new)
            continue
        flag = "--" + name.replace("_", "-")
        if name not in RESUME_MAY_CHANGE:
            raise UserError(f"--resume {args.resume}: {flag} {new} differs from the run's "
                            f"{values[name]} (its config.json), and would change the run; "
                            f"drop {flag}, or start a new run")
        changed[name] = [values[name], new]
        values[name] = new
    values["resume"] = args.resume
    out = type(args)(**values)
    out.given, out.resume_changes = getattr(args, "given", frozenset()), changed
    return out


def progress(iterable, desc: str):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, dynamic_ncols=True)


def close_bar(bar, steps_left: int) -> None:
    """Close a training bar whose loop stops early, showing the steps really done. (tqdm counts
    an iterable's items in a local variable and copies it to bar.n only when it redraws, so
    bar.n can be behind.)"""
    bar.n = bar.total - steps_left
    bar.close()


def plural(n: int, noun: str) -> str:
    """'1 step', '2 steps', '0 steps'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Run:
    """A run folder and everything that makes a run resumable.

    New run: runs/{algo}__{model}__{task}__{seed}__{time}/ with config.json, metrics.jsonl and
    completions.jsonl. With --resume DIR: loads the last good checkpoint of DIR into the model,
    optimizer, prompt sampler and RNGs, drops metric lines written after it, and appends.
    SIGINT/SIGTERM set `stop_requested`; the loop then checkpoints and stops cleanly.
    A checkpoint that does not verify or load (truncated, changed, non-finite) is skipped,
    with one note, for the one before it; metrics.jsonl and completions.jsonl are trimmed to
    the checkpoint's step, and config.json records the resume under "resumed".

    The algorithm's name is the calling script's (grpo.py -> "grpo"). `algo_state` is the
    method's own state across steps, {name: object with state_dict() / load_state_dict()}
    (DCPO's SAS statistics, SPO's replay buffer; None for GRPO): each checkpoint saves it in
    run.state[name], and --resume loads it back into the same object.
    """

    def __init__(self, args, model, tokenizer, optimizer, sampler: PromptSampler,
                 algo_state: Optional[dict] = None):
        import signal

        algo = Path(sys._getframe(1).f_code.co_filename).stem  # the script that made the Run
        self.args, self.algo, self.model, self.tokenizer = args, algo, model, tokenizer
        self.optimizer, self.sampler, self.algo_state = optimizer, sampler, algo_state or {}
        self.state: dict = {"step": 0}
        self.stop_requested = False
        self.bad_steps = 0  # steps in a row with every update skipped (non-finite loss or grad)
        self.stop_signal: Optional[int] = None
        if args.resume:
            self.run_dir = Path(args.resume)
            ckpt = self._resume()
            self.logger = RunLogger(self.run_dir, {}, append=True)
            print(f"resumed {self.run_dir} from {ckpt.name}", file=sys.stderr)
        else:
            self.run_dir = make_run_dir(args.output_dir, algo, args.model, args.task, args.seed)
            self.logger = RunLogger(self.run_dir, dict(algo=algo, **dataclasses.asdict(args)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.stop_requested:  # a second signal: stop now; checkpoints are written atomically
            raise Interrupted(signum, f"second {name}: stopped at once. The last complete "
                              f"checkpoint under {self.run_dir / 'checkpoints'} is intact; "
                              f"--resume {self.run_dir} continues")
        print(f"\n{name}: finishing this step, checkpointing, then stopping", file=sys.stderr)
        self.stop_requested, self.stop_signal = True, signum

    def _resume(self) -> Path:
        """Load the newest checkpoint that verifies and loads; fall back past corrupt ones."""
        if not (self.run_dir / "config.json").exists():
            raise UserError(f"{self.run_dir} is not a run folder (no config.json); "
                            "pass --resume a folder under runs/")
        for ckpt in checkpoints_newest_first(self.run_dir):
            problem = verify_checkpoint(ckpt) or self._load(ckpt)
            if problem is None:
                break
            print(f"note: checkpoint {ckpt.name} is not usable ({problem}); "
                  "falling back to the one before it", file=sys.stderr)
        else:
            raise UserError(f"{self.run_dir} has no complete checkpoint to resume from; "
                            "start a new run without --resume")
        step = self.state["step"]
        for log in ("metrics.jsonl", "completions.jsonl"):  # drop the steps the checkpoint lacks
            trim_jsonl(self.run_dir / log, step)
        (self.run_dir / "summary.json").unlink(missing_ok=True)  # written again when it ends
        if "best_accuracy" not in self.state:  # a checkpoint from before the best was kept
            for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)  # (trim_jsonl kept only whole lines)
                if row["step"] > 0 and "eval/accuracy" in row:
                    self._note_eval(row["step"], row["eval/accuracy"])
        config = json.loads((self.run_dir / "config.json").read_text())
        record = {"from_step": step, "checkpoint": ckpt.name, "time": round(time.time()),
                  "changed": getattr(self.args, "resume_changes", {})}
        config.setdefault("resumed", []).append(record)
        write_atomic(self.run_dir / "config.json", json.dumps(config, indent=2, default=str))
        return ckpt

    def _load(self, ckpt: Path) -> Optional[str]:
        """Load a checkpoint into the model, optimizer, sampler and RNGs, or say why it can't be."""
        from transformers import AutoModelForCausalLM

        try:
            dtype = next(self.model.parameters()).dtype
            saved = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
            trainer = torch.load(ckpt / "trainer_state.pt", weights_only=False)
            weights = saved.state_dict()
            if any(w.is_floating_point() and not torch.isfinite(w).all() for w in weights.values()):
                return "non-finite weights"
            self.model.load_state_dict(weights)
        except Exception as e:  # noqa: BLE001  (whatever a damaged file raises)
            return f"unreadable: {type(e).__name__}"
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.sampler.load_state_dict(trainer["sampler"])
        self.state = trainer["state"]
        for name, obj in self.algo_state.items():  # a refusal (UserError) stops the resume
            if name in self.state:
                obj.load_state_dict(self.state[name])
        set_rng_state(trainer["rng"])
        return None

    def save(self, step: int) -> Path:
        self.state.update({name: obj.state_dict() for name, obj in self.algo_state.items()})
        trainer = {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                   "state": self.state}
        return save_checkpoint(self.run_dir, step, self.model, self.tokenizer, trainer)

    def log(self, step: int, metrics: dict) -> None:
        """Append the step's metrics; stop the run after --max-bad-steps non-finite steps in a row.

        A step counts as bad when it had updates and every one was skipped (optimizer_step
        found a non-finite gradient, which a non-finite loss also gives). The weights did
        not change, and no checkpoint is written, so the last good checkpoint stays.
        """
        self.logger.log(step, metrics)
        if "eval/accuracy" in metrics:
            self._note_eval(step, metrics["eval/accuracy"])
        passes, skipped = metrics.get("num_updates", 0), metrics.get("skipped_updates", 0)
        self.bad_steps = self.bad_steps + 1 if passes > 0 and skipped == passes else 0
        limit = self.args.max_bad_steps
        if limit > 0 and self.bad_steps >= limit:
            self.logger.close()
            last = latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"{plural(self.bad_steps, 'step')} in a row had a non-finite loss or gradient "
                f"(step {step}). Last good checkpoint: {last or 'none yet'}. Lower "
                "--learning-rate, or raise --max-bad-steps (0 never stops), then --resume the run")

    def best(self) -> tuple[float, int]:
        """The best held-out accuracy so far and the first step that reached it (0: the start)."""
        if "best_accuracy" not in self.state:
            return self.state["start_accuracy"], 0
        return self.state["best_accuracy"], self.state["best_step"]

    def _note_eval(self, step: int, accuracy: float) -> None:
        if accuracy > self.best()[0]:  # kept in run.state, so a checkpoint and --resume keep it
            self.state["best_accuracy"], self.state["best_step"] = accuracy, step

    def end_step(self, step: int, metrics: dict, texts: list[str], rewards: torch.Tensor,
                 idx: list[int], examples: list[dict], num_generations: int) -> None:
        self.log(step, metrics)
        if step % self.args.log_completions_every == 0:  # the first group of this batch, as text
            q = examples[idx[0]]["question"]
            self.logger.log_completions(step, [q] * num_generations, texts[:num_generations],
                                        rewards[:num_generations].tolist())

    def finish(self, final_accuracy: float, wall_time: float) -> dict:
        """Write summary.json and print the summary line: the start, last and best held-out
        accuracy (the best with its step). Its "status" is "finished", or "interrupted" (with the
        signal)."""
        import signal

        start = self.state["start_accuracy"]
        best, best_step = self.best()
        summary = dict(algo=self.algo, start_accuracy=start, final_accuracy=final_accuracy,
                       best_accuracy=best, best_step=best_step,
                       steps=self.state["step"], wall_time_s=round(wall_time, 1),
                       run_dir=str(self.run_dir))
        summary["status"] = "finished" if self.stop_signal is None else "interrupted"
        if self.stop_signal is not None:
            summary["signal"] = signal.Signals(self.stop_signal).name
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        if self.stop_signal is not None:
            print(f"{self.algo}: interrupted by {summary['signal']} at step {summary['steps']} of "
                  f"{self.args.total_steps}; --resume {self.run_dir} continues", flush=True)
            return summary
        print(f"{self.algo}: held-out greedy accuracy {start:.3f} -> {final_accuracy:.3f} "
              f"({100 * (final_accuracy - start):+.1f} pts; best {best:.3f} at step {best_step}) "
              f"in {plural(summary['steps'], 'step')}, {wall_time:.0f}s; saved to {self.run_dir}",
              flush=True)
        return summary


# ----------------------------------------------------------------------------------------
# 12. Credit view: one group's completions, each token with its advantage (model-free)
# ----------------------------------------------------------------------------------------

_GREENS = (151, 114, 77, 40, 46)    # 256-colour ANSI codes, weakest to strongest
_REDS = (224, 210, 203, 196, 160)


def pick_credit_group(rewards: torch.Tensor, num_generations: int) -> Optional[int]:
    """The group to show in a credit view: one whose rewards differ, or None if none does.

    Of the groups with a spread, the one whose mean reward is nearest 1/2 (the most even split
    of right and wrong answers, so the most tokens get credit); ties go to the earliest.
    rewards [B], group-contiguous. Example, G = 4: [0,0,0,0, 1,0,0,0, 1,1,0,0] -> 2; all equal:
    None.
    """
    r = rewards.detach().double().cpu().view(-1, num_generations)           # [groups, G]
    spread = (r.max(1).values - r.min(1).values) > 1e-9
    if not spread.any():
        return None
    distance = torch.where(spread, (r.mean(1) - 0.5).abs(), torch.full_like(r[:, 0], math.inf))
    return int(torch.argmin(distance))  # argmin returns the first of equal minima


def credit_marks(advantages: torch.Tensor, flat: torch.Tensor, completion_mask: torch.Tensor,
                 tol: float = 1e-6) -> torch.Tensor:
    """The tokens whose advantage differs from GRPO's flat one: |A_t - flat_i| > tol, on mask.

    advantages [G, L], flat [G], completion_mask [G, L] -> bool [G, L]. For TEMPO these are the
    tokens with a TD term: the branch points of the group's prefix tree.
    """
    a, f = advantages.detach().double().cpu(), flat.detach().double().cpu()[:, None]
    return ((a - f).abs() > tol) & (completion_mask.detach().cpu() > 0)


def credit_group_text(step: int, examples: list[dict], idx: list[int], rewards: torch.Tensor,
                      num_generations: int, render: typing.Callable[[slice], str]) -> str:
    """The credit view's text for one step: the picked group's header and `render(rows)`, or one
    line saying that no group's rewards differ (every advantage of the step is then 0)."""
    g = pick_credit_group(rewards, num_generations)
    if g is None:
        groups = "its one group" if len(idx) == 1 else f"all {len(idx)} groups"
        return (f"step {step}, credit view: in {groups} every completion has the same reward, so "
                "every advantage is 0; nothing to show")
    ex, rows = examples[idx[g]], slice(g * num_generations, (g + 1) * num_generations)
    return (f"step {step}, credit view of {ex['question']!r} (gold {ex['answer']}), "
            f"group {g + 1} of {len(idx)}; " + render(rows))


def render_credit(tokens: typing.Sequence[typing.Sequence[str]], advantages: torch.Tensor,
                  completion_mask: torch.Tensor, color: bool = False,
                  flat: Optional[torch.Tensor] = None,
                  rewards: Optional[torch.Tensor] = None, decimals: int = 2,
                  marks: Optional[torch.Tensor] = None) -> str:
    """One line per completion; each real token (mask > 0) followed by its advantage.

    plain: "o1 (r=1.00, GRPO +0.87): A[+1.15]B[+0.58]"  (sign always; tokens are not separated,
           so the text reads as it was generated)
    color: each token green (A > 0) or red (A < 0), shade ~ |A| / max |A| of the rows shown;
           A == 0 uncoloured; no numbers. Newlines and tabs show as \\n and \\t: one line each.
    tokens: G lists of token strings (at least |o_i| each); advantages [G, L] (or [G] for a
    sequence-level method), completion_mask [G, L]; flat, rewards: optional [G], shown in front.
    marks: optional bool [G, L]; then only marked tokens get a number (or a colour), the others
    are printed bare, e.g. "o1 (r=1.00, GRPO +0.87): AB[+1.15]C" (credit_marks: != GRPO).
    """
    m = completion_mask.detach().cpu() > 0                                   # [G, L]
    adv = advantages.detach().to(torch.float64).cpu()
    adv = adv[:, None].expand(m.shape) if adv.dim() == 1 else adv            # [G, L]
    scale = float(adv[m].abs().max()) if m.any() else 0.0
    lines = []
    for i, toks in enumerate(tokens):
        n = int(m[i].sum())
        if len(toks) < n:
            raise ValueError(f"completion {i}: {len(toks)} token strings for {n} masked tokens")
        parts = []
        for t in range(n):
            s, a = toks[t].replace("\n", "\\n").replace("\t", "\\t"), float(adv[i, t])
            if marks is not None and not bool(marks[i, t]):
                parts.append(s)
            elif not color:
                parts.append(f"{s}[{a:+.{decimals}f}]")
            elif a == 0.0 or scale == 0.0:
                parts.append(s)
            else:
                shade = min(int(abs(a) / scale * len(_GREENS)), len(_GREENS) - 1)
                code = (_GREENS if a > 0 else _REDS)[shade]
                parts.append(f"\x1b[38;5;{code}m{s}\x1b[0m")
        notes = ([f"r={float(rewards[i]):.2f}"] if rewards is not None else []) + \
                ([f"GRPO {float(flat[i]):+.{decimals}f}"] if flat is not None else [])
        head = f"o{i + 1}" + (f" ({', '.join(notes)})" if notes else "")
        lines.append(head + ": " + "".join(parts))
    return "\n".join(lines)


def credit_view(tokenizer, completion_ids: torch.Tensor, advantages: torch.Tensor,
                completion_mask: torch.Tensor,
                flat: Optional[torch.Tensor] = None, rewards: Optional[torch.Tensor] = None,
                color: Optional[bool] = None, only_diff: bool = False,
                value: str = "advantage") -> str:
    """render_credit with each token decoded on its own; colour when stdout is a terminal.
    only_diff: mark only the tokens whose advantage differs from `flat` (credit_marks).
    The first line is a key to the rest; value names what `advantages` holds."""
    lengths = (completion_mask > 0).sum(1).tolist()
    tokens = [[tokenizer.decode([t]) for t in row[:n]]
              for row, n in zip(completion_ids.tolist(), lengths)]
    marks = credit_marks(advantages, flat, completion_mask) if only_diff else None
    color = sys.stdout.isatty() if color is None else color
    if color:
        key = f"key: colour = the token's {value}: green > 0, red < 0, deeper = larger"
        key += "; uncoloured = 0" + (" or GRPO's flat advantage" if only_diff else "")
    else:
        key = f"key: x[+0.12] = the {value} of token x, the token just before the [ ]"
        key += "; a token without [ ] has GRPO's flat advantage" if only_diff else ""
    return key + "\n" + render_credit(tokens, advantages, completion_mask, color, flat, rewards,
                                      marks=marks)


def cpu_description() -> str:
    """The CPU's model name and its bf16 flags (none on most laptops), for the record."""
    import platform
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", info)))
    cores = len(re.findall(r"^processor\s*:", info, re.M))
    return f"{name.group(1) if name else platform.machine()}, {cores} cores, flags: " + \
        (" ".join(flags) or "none of avx2/avx512_bf16/amx_bf16")


# ----------------------------------------------------------------------------------------
# 13. The embedded tiny model: a character tokenizer, a 1.8M-parameter Llama, its warm start
# ----------------------------------------------------------------------------------------

# Only `--model tiny` reaches this section (load_model_and_tokenizer calls ensure_tiny_model).

TINY_VERSION = "v4"             # the warm start's recipe; a cached folder of another is unused
TINY_DIR = Path(__file__).resolve().parent / "tiny"  # the shipped warm starts (tiny/build.py)
TINY_SHIPPED = ((2, 4), (6, 8))  # the length settings shipped there, for seed 0
TINY_TARGET_ACC = (0.10, 0.60)  # the warm start stops inside this band of held-out accuracy
TINY_STOP_ACC = 0.30            # ... at the first evaluation at or above this, leaving room for RL


def cache_root() -> Path:
    return Path(os.environ.get("TOKENCREDIT_CACHE", Path.home() / ".cache" / "tokencredit"))


def build_char_tokenizer(vocab_size: Optional[int] = None):
    """A character-level tokenizer in Hugging Face format: one token per printable ASCII char.

    vocab_size pads the vocabulary with filler tokens "<t123>" (never produced by encoding), so
    that a random model with a large vocabulary can decode whatever it samples (benchmarks).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size or 0)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_context(ops: tuple[int, int] = ARITH_OPS) -> int:
    """The tiny model's context for a length setting: 256, or the power of two that holds the
    longest prompt ('Q:' + 3 * HI + 2 characters + '\\nA:') plus arith_completion_length.

    256 up to 19 operations (12 * HI + 19 tokens at most); 512 from 20 to 32.
    """
    need = 3 * ops[1] + 7 + arith_completion_length(ops)
    return max(256, 1 << (need - 1).bit_length())


def build_tiny_model(vocab_size: int, pad_id: int, eos_id: int, context: int = 256):
    """A ~1.8M-parameter Llama built from a transformers config (no dropout anywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6,
                         max_position_embeddings=context, tie_word_embeddings=True,
                         pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                         attention_dropout=0.0)
    return LlamaForCausalLM(config)


def tiny_tag(ops: tuple[int, int]) -> str:
    """The folder name of a length setting's warm start: tiny-arith-2-4, tiny-arith-6-8, ..."""
    return f"tiny-arith-{ops[0]}-{ops[1]}"


def shipped_tiny_dir(ops: tuple[int, int]) -> Path:
    """Where a shipped setting's folder lies: tiny/arith-2-4, tiny/arith-6-8."""
    return TINY_DIR / f"arith-{ops[0]}-{ops[1]}"


def shipped_tiny_problem(path: Path) -> Optional[str]:
    """None if the shipped folder at `path` is whole (every file matches the sha256 recorded in
    its warm_start.json), else what is wrong with it, in a few words."""
    try:
        files = json.loads((path / "warm_start.json").read_text())["files"]
    except FileNotFoundError:
        return "it is missing"
    except (ValueError, KeyError, TypeError):
        return "its warm_start.json is unreadable"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_file(path / name) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def ensure_tiny_model(seed: int = 0, quiet: bool = False, ops: tuple[int, int] = ARITH_OPS) -> Path:
    """Return the folder of the warm-started tiny model for the length setting `ops`.

    The settings in TINY_SHIPPED (seed 0) ship with the repository, in tiny/, and load in well
    under a second on any machine (their files are checked against recorded hashes first).
    Any other setting or seed is warm-started on first use (build_tiny_model_folder, a few
    minutes on 2 cores) and cached in cache_root(). A missing or damaged shipped folder is
    said in one line and rebuilt the same way, into the cache.
    """
    if seed == 0 and tuple(ops) in TINY_SHIPPED:
        shipped = shipped_tiny_dir(ops)
        problem = shipped_tiny_problem(shipped)
        if problem is None:
            return shipped
        print(f"the shipped tiny model {shipped} is unusable ({problem}); warm-starting it "
              f"into {cache_root()} instead (restore it with `git checkout -- tiny`)",
              file=sys.stderr)
    path = cache_root() / f"{tiny_tag(ops)}-{TINY_VERSION}-seed{seed}"
    if not (path / "warm_start.json").exists():
        build_tiny_model_folder(path, seed=seed, ops=ops, quiet=quiet)
    return path


def build_tiny_model_folder(path: Path, seed: int = 0, ops: tuple[int, int] = ARITH_OPS,
                            quiet: bool = False, record: Optional[dict] = None,
                            max_steps: int = 3000, eval_every: int = 50) -> dict:
    """Warm-start the tiny model for the length setting `ops` and save it at `path`.

    The warm start is a short supervised fine-tune on the arithmetic task's training split
    (prompt -> chain-of-thought solution). It stops at the first evaluation whose held-out
    greedy accuracy reaches TINY_STOP_ACC (it must then lie in TINY_TARGET_ACC), so
    reinforcement learning has room to improve it. It runs in fp32, so it is the same on
    every CPU up to the rounding of its matrix products, and deterministic for a seed on one
    machine. The folder loads with AutoModelForCausalLM.from_pretrained; its warm_start.json
    says how it was built (plus `record`) and holds every other file's sha256.
    """
    from tqdm import tqdm

    seed_everything(seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                             tiny_context(ops))
    test = arith_dataset("test", ops=ops)[:200]
    rows = sft_rows(tokenizer, arith_dataset("sft", ops=ops))
    eval_tokens = max(64, arith_completion_length(ops))  # 64 for the default setting
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch_size = 64
    gen = torch.Generator().manual_seed(seed)
    t0, acc, step = time.time(), 0.0, 0
    # The run stops at an accuracy, not a step count: the bar counts held-out accuracy points
    # toward the target, updated at each evaluation, so its total is the work really done. It
    # shows no ETA: accuracy does not rise at a steady rate.
    target = round(100 * TINY_STOP_ACC)
    bar = tqdm(total=target, desc="warm start: held-out accuracy (%) toward its target",
               disable=quiet, leave=False,
               bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}{postfix}]")
    for step in range(1, max_steps + 1):
        batch = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist()]
        loss = sft_loss(model, tokenizer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % eval_every == 0:
            acc = evaluate(model, tokenizer, test, "arith", eval_tokens, batch_size=200)
            bar.n = min(100 * acc, target)
            bar.set_postfix(step=step, loss=f"{loss.item():.3f}")  # refreshes the bar
            if acc >= TINY_STOP_ACC:
                break
    bar.close()
    if not TINY_TARGET_ACC[0] <= acc <= TINY_TARGET_ACC[1]:
        raise RuntimeError(f"tiny-model warm start ended at held-out accuracy {acc:.2f}, "
                           f"outside {TINY_TARGET_ACC}")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = dict(seed=seed, arith_ops=f"{ops[0]}-{ops[1]}", sft_steps=step, heldout_accuracy=acc,
                heldout_problems=len(test), seconds=round(time.time() - t0, 1),
                sft_matmuls="fp32", parameters=sum(p.numel() for p in model.parameters()),
                torch=torch.__version__, **(record or {}))
    info["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    (tmp / "warm_start.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)  # atomic: a half-written model is never used
    if not quiet:
        print(f"warm start: {plural(step, 'SFT step')}, held-out accuracy {acc:.3f}, "
              f"{info['seconds']}s -> {path}")
    return info


def sft_rows(tokenizer, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Tokenise each (prompt, solution + EOS) pair once, before training."""
    eos = tokenizer.eos_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(ids(format_prompt(tokenizer, ex["question"], "arith")), ids(ex["solution"]) + [eos])
            for ex in examples]


def sft_loss(model, tokenizer, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean next-token cross-entropy on the target tokens only. rows: (prompt ids, target ids)."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):  # right padding is fine for teacher forcing
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
        attn[i, : len(p) + len(t)] = 1
    ids, labels, attn = (t.to(next(model.parameters()).device) for t in (ids, labels, attn))
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [N, W-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1))
