"""Peak memory of one TDPO loss step against one DPO step on the same batch, and of a cDPO
round against a DPO round (CPU).

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

cDPO (--loss cdpo) adds, once per round: two short fine-tunes of copies of the reference (the
positive and negative models) and one scoring pass over the round's pairs that needs the full
vocabulary of both models at every rejected position. The scoring runs in chunks of positions
(no [2N, L, V] fp32 copy). The second table compares, on the same 4 pairs:

  dpo round            2 DPO steps (2 epochs of 1 batch), as above
  cdpo round           the cDPO extra (2 fine-tunes of CE_SFT_STEPS steps of CE_SFT_ROWS rows,
                       then the chunked scoring), then 2 cDPO steps
  cdpo extra           the extra alone, and its parts: the fine-tunes, the scoring
  cdpo scoring (naive) full logits of both models and one fp32 log_softmax over [2N, L, V]

The fine-tunes here are scaled down (the defaults are 30 steps of 32 rows); their time grows
with steps x rows, their peak with rows (common.sft_loss builds the rows' full logits).

Run: OMP_NUM_THREADS=1 python benchmarks/perf/bench_token_dpo_memory.py [--only WORD,WORD]
(--only: measure just the rows whose name contains one of the words, e.g. --only scoring)
"""
import argparse
import itertools
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import common  # noqa: E402
import token_dpo as T  # noqa: E402

VOCAB, HIDDEN, LAYERS = 128_256, 256, 2
PAIRS, PROMPT_LEN, RESPONSE_LEN = 4, 32, 128
CHUNK = 256  # token_dpo.py's default --kl-chunk-size
CE_SFT_STEPS, CE_SFT_ROWS = 2, 4  # scaled down from the defaults (30 steps of 32 rows)


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
    return policy, ref, common.collate_pairs(pairs, 0, "cpu"), pairs


def step_chunked(policy, ref, batch, loss: str):
    hidden = common.response_hidden_states(policy, *batch)
    with torch.no_grad():
        ref_hidden = common.response_hidden_states(ref, *batch)
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


CE_ARGS = SimpleNamespace(seed=0, ce_sft_steps=CE_SFT_STEPS, ce_sft_rows=CE_SFT_ROWS,
                          ce_sft_lr=3e-4, ce_beta=1.0, micro_batch_size=2 * PAIRS,
                          kl_chunk_size=CHUNK)
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1)


def ce_rows(pairs):
    return ([(p["prompt"], p["chosen"]) for p in pairs],
            [(p["prompt"], p["rejected"]) for p in pairs])


def cdpo_extra(ref, pairs):
    """token_dpo.add_cdpo_weights: fine-tune pi_p and pi_n from copies of ref, score, free them."""
    fresh = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    T.add_cdpo_weights(fresh, *ce_rows(fresh), ref, TOKENIZER, CE_ARGS, 1, "cpu")
    return fresh


def cdpo_finetunes(ref, pairs):
    """The two fine-tunes alone (each model freed before the next, as in add_cdpo_weights)."""
    for rows in ce_rows(pairs):
        model, _ = T.train_ce_model(ref, TOKENIZER, rows, CE_SFT_STEPS, CE_SFT_ROWS, 3e-4,
                                    torch.Generator().manual_seed(0))
        del model


def step_cdpo(policy, ref, batch, weights):
    hidden = common.response_hidden_states(policy, *batch)
    with torch.no_grad():
        ref_hidden = common.response_hidden_states(ref, *batch)
    logps, ref_logps, kl = T.token_logps_and_kl(hidden, ref_hidden, batch[2], batch[3],
                                                policy.lm_head, ref.lm_head, CHUNK)
    parts = (logps, ref_logps, batch[3], kl.detach())
    (pw, pl), (rw, rl), (mw, ml), (kw, kr) = (t.chunk(2) for t in parts)
    T.cdpo_loss(pw, pl, rw, rl, mw, ml, weights, 0.1, kw, kr)[0].backward()


def cdpo_round(policy, ref, batch, pairs):
    scored = cdpo_extra(ref, pairs)
    weights = torch.zeros_like(batch[3][PAIRS:])
    for i, p in enumerate(scored):
        weights[i, :len(p["rejected"])] = torch.tensor(p["rejected_weights"])
    for _ in range(2):
        step_cdpo(policy, ref, batch, weights)


@torch.no_grad()
def scoring_naive(pos, neg, batch):
    """What the chunks avoid: full logits of both models, one fp32 log_softmax over [2N, L, V]."""
    L = batch[2].size(1)
    inputs = dict(input_ids=torch.cat([batch[0], batch[2]], 1),
                  attention_mask=torch.cat([batch[1], batch[3].long()], 1))
    lp = torch.log_softmax(pos(**inputs, logits_to_keep=L + 1).logits[:, :-1].float(), -1)
    ln = torch.log_softmax(neg(**inputs, logits_to_keep=L + 1).logits[:, :-1].float(), -1)
    c = torch.log_softmax(2 * lp - ln, -1).gather(-1, batch[2][..., None]).exp()
    return (1 - c.squeeze(-1)) * batch[3]


def peak_bytes(fn) -> tuple[int, float]:
    """(peak bytes allocated during fn and alive at once, seconds)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="WORD,WORD: measure just the rows whose name contains a word")
    a = p.parse_args()
    only = a.only.split(",") if a.only else None
    wanted = lambda name: only is None or any(w in name for w in only)  # noqa: E731
    policy, ref, batch, pairs = build()
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
    for name, fn in ((k, v) for k, v in variants.items() if wanted(k)):
        fn()  # warm-up (first-call allocations), then measure
        policy.zero_grad(set_to_none=True)
        peak, seconds = peak_bytes(fn)
        policy.zero_grad(set_to_none=True)
        print(f"{name:32s} peak {peak / 2**20:8,.0f} MiB  ({peak / full:4.2f} x one [2N, L, V] fp32)  {seconds:5.1f} s")

    # ---- a cDPO round against a DPO round ----
    import copy
    pos, neg = copy.deepcopy(ref), copy.deepcopy(ref)  # stand-ins for trained pi_p and pi_n
    for m in (pos, neg):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
    hp = lambda: common.response_hidden_states(pos, *batch)  # noqa: E731
    hn = lambda: common.response_hidden_states(neg, *batch)  # noqa: E731
    print(f"\ncDPO: fine-tunes of {CE_SFT_STEPS} steps x {CE_SFT_ROWS} rows (default 30 x 32); "
          f"model {sum(p.numel() for p in ref.parameters()) * 4 / 2**20:,.0f} MiB fp32")
    chunked = lambda: T.cdpo_weights(hp(), hn(), batch[2], batch[3], 1.0, pos.lm_head,  # noqa: E731
                                     neg.lm_head, CHUNK)
    dpo_round = lambda: [step_chunked(policy, ref, batch, "dpo") for _ in range(2)]  # noqa: E731
    rounds = {"dpo round (2 steps)": dpo_round,
              "cdpo round (extra + 2 steps)": lambda: cdpo_round(policy, ref, batch, pairs),
              "cdpo extra (fine-tunes + scoring)": lambda: cdpo_extra(ref, pairs),
              "cdpo fine-tunes only": lambda: cdpo_finetunes(ref, pairs),
              "cdpo scoring (chunked)": chunked,
              "cdpo scoring (naive)": lambda: scoring_naive(pos, neg, batch)}
    w_chunked = chunked()
    assert torch.allclose(w_chunked, scoring_naive(pos, neg, batch), atol=1e-5)  # the same weights
    for name, fn in ((k, v) for k, v in rounds.items() if wanted(k)):
        fn()
        policy.zero_grad(set_to_none=True)
        peak, seconds = peak_bytes(fn)
        policy.zero_grad(set_to_none=True)
        print(f"{name:34s} peak {peak / 2**20:8,.0f} MiB  "
              f"({peak / full:4.2f} x one [2N, L, V] fp32)  {seconds:5.1f} s")


if __name__ == "__main__":
    main()
