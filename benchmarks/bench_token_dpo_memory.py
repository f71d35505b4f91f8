"""Peak memory of one TDPO loss step against one DPO step on the same batch (CPU).

Why it is needed: TDPO needs the full-vocabulary distributions of policy and reference at every
response position, which done naively is 2 models x 2N x L x V floats. token_dpo.py instead
runs the model bodies, then the LM heads one chunk of positions at a time under activation
checkpointing. This script measures four ways of computing one step
(policy forward with gradient, reference forward without, loss, backward) on one batch:

  dpo   (token_dpo.py)   bodies + chunked heads, gathered log-probs (the KL only logged, no grad)
  tdpo2 (token_dpo.py)   the same chunks, with the KL in the loss
  dpo   (full logits)    model(...).logits for both models + common.per_token_logps (TRL-style)
  tdpo2 (naive)          full logits of both models, one fp32 log_softmax over [2N, L, V]

Method: the torch profiler's allocation events (profile_memory=True): every tensor allocation
and free during the step, in time order. Peak = the largest running sum, i.e. the most bytes
allocated during the step and alive at once, on top of what existed before it (weights,
inputs). It counts tensors only, not Python objects. The model is a random 2-layer Llama with a
Llama-3-sized vocabulary, so the vocabulary terms dominate as they do in real models.

Run: cd /work/main && OMP_NUM_THREADS=1 python benchmarks/bench_token_dpo_memory.py
"""
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import token_dpo as T  # noqa: E402

VOCAB, HIDDEN, LAYERS = 128_256, 256, 2
PAIRS, PROMPT_LEN, RESPONSE_LEN = 4, 32, 128
CHUNK = 256  # token_dpo.py's default --kl-chunk-size


def build():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    policy, ref = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    pairs = [{"prompt": torch.randint(2, VOCAB, (PROMPT_LEN,), generator=g).tolist(),
              "chosen": torch.randint(2, VOCAB, (RESPONSE_LEN,), generator=g).tolist(),
              "rejected": torch.randint(2, VOCAB, (RESPONSE_LEN - 16,), generator=g).tolist()} for _ in range(PAIRS)]
    return policy, ref, T.collate_pairs(pairs, 0, "cpu")


def step_chunked(policy, ref, batch, loss: str):
    hidden = T.response_hidden_states(policy, *batch)
    with torch.no_grad():
        ref_hidden = T.response_hidden_states(ref, *batch)
    logps, ref_logps, kl = T.token_logps_and_kl(hidden, ref_hidden, batch[2], batch[3], policy.lm_head, ref.lm_head, CHUNK)
    if loss == "dpo":
        kl = kl.detach()
    (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (t.chunk(2) for t in (logps, ref_logps, batch[3], kl))
    out = T.dpo_loss(pw, pl, rw, rl, mw, ml, 0.1, kw, kr)[0] if loss == "dpo" else \
        T.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, 0.1, 0.5, version=2)[0]
    out.backward()


def step_full_logits_dpo(policy, ref, batch):
    logps, _ = common.per_token_logps(policy, *batch, 1.0)
    with torch.no_grad():
        ref_logps, _ = common.per_token_logps(ref, *batch, 1.0)
    (pw, pl), (rw, rl), (mw, ml) = (t.chunk(2) for t in (logps, ref_logps, batch[3]))
    T.dpo_loss(pw, pl, rw, rl, mw, ml, 0.1)[0].backward()


def step_naive_tdpo(policy, ref, batch):
    L = batch[2].size(1)
    inputs = dict(input_ids=torch.cat([batch[0], batch[2]], 1), attention_mask=torch.cat([batch[1], batch[3].long()], 1))
    logits = policy(**inputs, logits_to_keep=L + 1).logits[:, :-1]                  # [2N, L, V]
    with torch.no_grad():
        ref_logits = ref(**inputs, logits_to_keep=L + 1).logits[:, :-1]
    logp, logq = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)  # whole [2N, L, V]
    kl = (logq.exp() * (logq - logp)).sum(-1)
    ids = batch[2][..., None]
    lp, lq = logp.gather(-1, ids).squeeze(-1), logq.gather(-1, ids).squeeze(-1)
    (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (t.chunk(2) for t in (lp, lq, batch[3], kl))
    T.tdpo_loss(pw, pl, rw, rl, mw, ml, kw, kr, 0.1, 0.5, version=2)[0].backward()


def peak_bytes(fn) -> tuple[int, float]:
    """(peak bytes allocated during fn and alive at once, seconds)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0), seconds


def main():
    policy, ref, batch = build()
    n_seq, L = batch[2].shape
    full = n_seq * L * VOCAB * 4
    print(f"batch: {PAIRS} pairs = {n_seq} sequences, prompt {PROMPT_LEN}, response <= {L} tokens "
          f"({int(batch[3].sum())} response tokens); V = {VOCAB:,}; one fp32 [2N, L, V] tensor = {full / 2**20:,.0f} MiB")
    variants = {"dpo   (token_dpo.py, chunked)": lambda: step_chunked(policy, ref, batch, "dpo"),
                "tdpo2 (token_dpo.py, chunked)": lambda: step_chunked(policy, ref, batch, "tdpo2"),
                "dpo   (full logits)": lambda: step_full_logits_dpo(policy, ref, batch),
                "tdpo2 (naive, full logits)": lambda: step_naive_tdpo(policy, ref, batch)}
    grads = sum(p.numel() * 4 for p in policy.parameters())
    print(f"every peak includes the policy's parameter gradients, {grads / 2**20:,.0f} MiB")
    for name, fn in variants.items():
        fn()  # warm-up (first-call allocations), then measure
        policy.zero_grad(set_to_none=True)
        peak, seconds = peak_bytes(fn)
        policy.zero_grad(set_to_none=True)
        print(f"{name:32s} peak {peak / 2**20:8,.0f} MiB  ({peak / full:4.2f} x one [2N, L, V] fp32)  {seconds:5.1f} s")


if __name__ == "__main__":
    main()
