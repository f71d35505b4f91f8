"""SPO: Segment Policy Optimization, with the chain (short CoT) and tree (long CoT) variants.

Paper: Guo, Xu, Liu, Ye, Qiu, "Segment Policy Optimization: Effective Segment-Level Credit
Assignment in RL for Large Language Models", arXiv 2505.23564 (NeurIPS 2025). Docs: docs/spo.md
(the math, worked numbers, the defaults and which source each follows).

GRPO gives every token of a response the same credit; PPO wants per-token credit from a critic.
SPO cuts each response into a few segments and estimates the value V at each segment boundary
by Monte Carlo: sample continuations from that state and average their rewards. A segment's
advantage is V(its end) - V(its start), exact in expectation because token transitions are
deterministic. SPO-chain puts boundaries just before low-probability tokens (p < 0.9, where the
model could have gone another way) and continues each boundary N times. SPO-tree grows a tree of
M-token segments, so the samples behind the values are training data too: a node's advantage is
its value minus its parent's. Both train with PPO's clip under a probability mask: only tokens
with old probability below 0.9 carry their segment's advantage.

    python spo.py                                    # CPU: tiny model + arithmetic, SPO-chain
    python spo.py --variant tree                     # SPO-tree 6-6-6 (slow on a CPU; see below)
    python spo.py --variant tree --tree-branching 4,4,4 --tree-replay-iters 1   # a lighter tree
    python spo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k   # one GPU (chain, N = 9)
    python spo.py --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --variant tree   # (tree, M = 30)
    python spo.py --partition stride --whiten-advantages            # the official code's choices
    python spo.py --show-credit 10                   # print one group's segment credit

Settings. The paper's values are the defaults for a hub model: rho = 0.9, a cutpoint
interval of 5, N = 9 continuations per boundary, tree 6-6-6 with M = 30 tokens. Two are smaller
for the embedded tiny model, where a CPU pays for every continuation and a token is a character:
  --num-rollouts 2 (paper 9): so that `python spo.py` fits in ten minutes on two CPU cores;
                        the Monte Carlo is then about a third of a step's time
  --tree-segment-length 12 (paper 30 BPE tokens): a 48-character answer must span more than one
                        level, or every node is an early leaf
The tree samples up to 6 + 36 + 216 segments per prompt and trains on up to 32 of them per
question per step, plus replayed ones: on a CPU it is about ten times slower than the chain.

Watch `reward` and `eval/accuracy`, then `spo/mask_keep_frac` (the share of tokens trained on)
and `spo/mc_time_share` (what the value estimates cost). A step where no token has p < rho has
nothing to learn from and is skipped (`spo/skipped_step`).
"""
from __future__ import annotations

import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch

import common

TINY_LEARNING_RATE = 5e-5  # the one value for the embedded tiny model, shared by every script
HUB_LEARNING_RATE = 1e-6
HUB_NUM_ROLLOUTS, TINY_NUM_ROLLOUTS = 9, 2                  # N: the paper's 9; the CPU's budget
HUB_TREE_SEGMENT_LENGTH, TINY_TREE_SEGMENT_LENGTH = 30, 12  # M: paper (BPE tokens); characters


@dataclass
class Args:
    """SPO (Segment Policy Optimization), variants chain and tree."""
    # --- run ---
    seed: int = field(default=0, metadata={"range": "[0, SEED_MAX]", "help":
        "random seed (python, numpy, torch, prompt order)"})
    model: str = field(default="tiny", metadata={"range": "model", "help":
        "'tiny' (embedded, warm-started on first use), a hub id or a save_pretrained folder"})
    task: Literal["arith", "gsm8k"] = field(default="arith", metadata={"help":
        "arith: embedded multi-step arithmetic; gsm8k: grade-school math"})
    arith_ops: str = field(default="2-4", metadata={"range": "arith_ops", "help":
        "arith: operations per problem, LO-HI (at least 2; longer chains, longer answers)"})
    data_dir: Optional[str] = field(default=None, metadata={"range": "data_dir", "help":
        "folder with GSM8K train.jsonl/test.jsonl, or hub (needs `datasets`)"})
    total_steps: int = field(default=80, metadata={"range": ">0", "help":
        "rollout batches to train on (each gives num_iterations optimizer steps)"})
    eval_every: int = field(default=20, metadata={"range": ">0", "help":
        "greedy held-out evaluation every N steps"})
    eval_size: int = field(default=500, metadata={"range": ">0", "help":
        "held-out examples for greedy evaluation"})
    save_every: int = field(default=50, metadata={"range": ">0", "help":
        "checkpoint every N steps (also on SIGINT/SIGTERM and at the end)"})
    output_dir: str = field(default="runs", metadata={"range": "output_dir", "help":
        "parent folder of the run folder"})
    resume: Optional[str] = field(default=None, metadata={"range": "run_dir", "help":
        "a run folder to continue from its last good checkpoint"})
    device: str = field(default="auto", metadata={"range": "device", "help":
        "auto, cpu, cuda, cuda:1, ..."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "range": "dtype", "help": "compute dtype of every forward pass (autocast); the policy's "
        "weights, gradients and AdamW state are always fp32, frozen models are stored in it; "
        "auto = bfloat16 on a GPU that has it, else float32; float16 is refused"})
    micro_batch_size: int = field(default=32, metadata={"range": ">0", "help":
        "completions per forward/backward (gradient accumulation; same result)"})
    log_completions_every: int = field(default=10, metadata={"range": ">0", "help":
        "write a few completions to completions.jsonl every N steps"})
    # --- shared base settings: identical in every script (docs/grpo.md, "Defaults") ---
    num_generations: int = field(default=8, metadata={"range": ">=2", "help":
        "G, completions per prompt"})
    prompts_per_step: int = field(default=16, metadata={"range": ">0", "help":
        "prompts per rollout batch (B = prompts_per_step * G)"})
    num_iterations: int = field(default=2, metadata={"range": ">0", "help":
        "mu, optimisation passes over each rollout batch"})
    learning_rate: Optional[float] = field(default=None, metadata={"range": ">0", "help":
        f"AdamW lr; default {HUB_LEARNING_RATE} for hub models, {TINY_LEARNING_RATE} for the "
        "tiny model"})
    max_grad_norm: float = field(default=1.0, metadata={"range": ">0", "help":
        "gradient-norm clip"})
    max_bad_steps: int = field(default=5, metadata={"range": ">=0", "help":
        "stop after this many steps in a row with a non-finite loss or gradient (0: never)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help":
        "recompute activations in backward: less memory for bigger models, about one more "
        "forward of compute"})
    temperature: float = field(default=1.0, metadata={"range": ">0", "help":
        "sampling temperature T (log-probs use logits / T too)"})
    top_p: float = field(default=1.0, metadata={"range": "(0, 1]", "help":
        "nucleus sampling; keep 1.0 so the sampler equals softmax(z/T)"})
    top_k: int = field(default=0, metadata={"range": ">=0", "help":
        "top-k sampling, 0 = off; keep 0 so the sampler equals softmax(z/T)"})
    max_completion_length: Optional[int] = field(default=None, metadata={"range": ">0", "help":
        "max new tokens; default 48 for arith, 512 for gsm8k"})
    beta: float = field(default=0.0, metadata={"range": ">=0", "help":
        "k3 KL coefficient to the frozen reference; 0 loads no reference model"})
    epsilon: float = field(default=0.2, metadata={"range": "[0, 1]", "help":
        "lower clip: ratio >= 1 - epsilon"})
    epsilon_high: float = field(default=0.2, metadata={"range": ">=0", "help":
        "upper clip: ratio <= 1 + epsilon_high (0.28 = DAPO clip-higher)"})
    # --- SPO-specific ---
    variant: Literal["chain", "tree"] = field(default="chain", metadata={"help":
        "chain: MC values at cutpoint boundaries (short CoT); tree: a tree of M-token segments "
        "(long CoT)"})
    rho: float = field(default=0.9, metadata={"range": "[0, 1]", "help":
        "tokens with old probability < rho are the cutpoints (chain) and the only tokens the "
        "loss keeps"})
    cutpoint_interval: int = field(default=5, metadata={"range": ">0", "help":
        "I, cutpoints per segment (chain): K = ceil(n / I) segments for n cutpoints"})
    partition: Literal["even", "stride"] = field(default="even", metadata={"help":
        "even: balanced cutpoint counts (paper); stride: every I-th cutpoint (official code)"})
    num_rollouts: Optional[int] = field(default=None, metadata={"range": ">0", "help":
        f"N, MC continuations per boundary (chain); default {HUB_NUM_ROLLOUTS} (paper) for hub "
        f"models, {TINY_NUM_ROLLOUTS} for the tiny model (CPU time)"})
    mc_batch_size: int = field(default=512, metadata={"range": ">0", "help":
        "rows per batched generate call for MC continuations and tree levels (memory and speed)"})
    whiten_advantages: bool = field(default=False, metadata={"help":
        "whiten advantages over the masked tokens of each micro-batch (official code); off = raw "
        "advantages (paper)"})
    tree_branching: str = field(default="6,6,6", metadata={"range": "int_list>0", "help":
        "children per node at each depth (tree); the paper also tests 4,4,4"})
    tree_segment_length: Optional[int] = field(default=None, metadata={"range": ">0", "help":
        f"M, tokens per tree segment; default {HUB_TREE_SEGMENT_LENGTH} (paper) for hub models, "
        f"{TINY_TREE_SEGMENT_LENGTH} for the tiny model's characters"})
    tree_adv: Literal["unnormalized", "normalized"] = field(default="unnormalized", metadata={
        "help": "unnormalized: V(n) - V(parent) (code); normalized: divided by the siblings' std"})
    tree_replay_iters: int = field(default=8, metadata={"range": ">0", "help":
        "steps a tree segment may wait in the replay buffer; 1 = on-policy"})
    tree_replay_per_question: int = field(default=32, metadata={"range": ">0", "help":
        "tree segments drawn per question per step (each is trained on once)"})
    show_credit: int = field(default=0, metadata={"range": ">=0", "help":
        "every N steps print one group with each token's advantage, '|' before each segment "
        "(chain; colour on a terminal); 0 = off"})


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the probability mask (which tokens carry credit, and where chain segments start)
# ----------------------------------------------------------------------------------------


def probability_mask(old_logps: torch.Tensor, completion_mask: torch.Tensor,
                     rho: float = 0.9) -> torch.Tensor:
    """SPO's probability mask, also the set of chain cutpoints.

        M_t = m_t * 1[p_t < rho],   p_t = pi_old(y_t | s_t) = exp(old_logp_t)   (from logits / T)

    old_logps, completion_mask: [B, L]. Returns M [B, L] (fp32 0/1); the cutpoints are M > 0.
    Compared in log space in fp64, so a probability of exactly rho is never let in by rounding;
    garbage (even NaN) at padded positions is never kept (NaN < x is False).
    Example: p = [0.95, 0.5, 0.9, 0.8999, 1.0] -> M = [0, 1, 0, 1, 0].
    """
    log_rho = torch.tensor(rho, dtype=torch.float64).log()  # rho = 0 -> -inf: nothing is kept
    return ((old_logps.double() < log_rho) & (completion_mask > 0)).float()


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the advantage, SPO-chain
# ----------------------------------------------------------------------------------------

PrefixKey = tuple[int, tuple[int, ...]]  # a boundary state: (prompt index, tokens before it)


def segment_starts(cutpoints: torch.Tensor, interval: int = 5,
                   partition: str = "even") -> torch.Tensor:
    """Where each segment starts: right BEFORE cutpoint u_{c_k}.

        U = [u_0 < ... < u_{n-1}], the positions with cutpoints[b, t];  K = ceil(n / I)
        "even"   (paper: minimises sum_k |U & seg_k|^2): the first (n mod K) segments hold
                 ceil(n/K) cutpoints, the others floor(n/K)
        "stride" (official code): c_k = k * I, so the counts are I, I, ..., n - (K-1) I
        boundary state S_k = prompt + y_0 .. y_{u_{c_k} - 1}   (the prompt alone if u_{c_k} = 0)

    cutpoints: BoolTensor [B, L]. Returns LongTensor [B, K_max]: row b's K_b starts, then -1.
    Example: p = [.99, .5, .95, .3, .97, .8, .2, .99, .6, .98] -> U = [1, 3, 5, 6, 8];
    I = 2 -> starts [1, 5, 8] under both rules. With n = 11 cutpoints at 0..10 and I = 5: even
    [0, 4, 8] (counts 4, 4, 3), stride [0, 5, 10] (counts 5, 5, 1). n = 0 -> no segment.
    """
    rows = []
    for row in cutpoints.tolist():  # ragged per response: a plain loop is the clear version
        u = [t for t, c in enumerate(row) if c]
        n = len(u)
        k = -(-n // interval)  # ceil(n / I); 0 when n = 0
        if partition == "stride":
            idx = list(range(0, n, interval))
        else:  # even: sizes differ by at most one, the larger ones first
            idx = [j * (n // k) + min(j, n % k) for j in range(k)]
        rows.append([u[c] for c in idx])
    out = torch.full((len(rows), max(map(len, rows), default=0)), -1, dtype=torch.long)  # [B, K]
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def plan_mc_prefixes(completion_ids: torch.Tensor, starts: torch.Tensor,
                     prompt_index: torch.Tensor) -> tuple[list[PrefixKey], torch.Tensor]:
    """The distinct boundary states of a batch, each to be continued N times once.

        key(b, k)   = (prompt_index[b], completion_ids[b, :starts[b, k]])   token ids, never text
        prefixes    = the distinct keys, in first-seen order
        index[b, k] = position of key(b, k) in prefixes (-1 where there is no boundary)

    completion_ids [B, L], starts [B, K_max], prompt_index [B]. Identical responses share all
    their boundaries, and a boundary at token 0 (the prompt alone) is shared by the group.
    Example: both completions of prompt 0 are [7, 8, 9] with starts [0, 2]
        -> prefixes [(0, ()), (0, (7, 8))], index [[0, 1], [0, 1]]: 2 states instead of 4.
    """
    keys: dict[PrefixKey, int] = {}
    index = torch.full_like(starts, -1)                                     # [B, K_max]
    ids = completion_ids.tolist()
    for b, row in enumerate(starts.tolist()):
        for k, s in enumerate(row):
            if s >= 0:
                index[b, k] = keys.setdefault((int(prompt_index[b]), tuple(ids[b][:s])), len(keys))
    return list(keys), index


def mc_values(rollout_rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The Monte Carlo value of each boundary, read back for every (response, boundary).

        V_hat(p)     = (1/N) sum_j R_pj          (an unfinished continuation scored 0)
        values[b, k] = V_hat(index[b, k]);  0 where index = -1

    rollout_rewards [P, N] (P distinct prefixes), index [B, K_max]. Returns [B, K_max].
    Example: R = [[1, 0], [1, 1]], index [[0, 1], [1, -1]] -> [[0.5, 1.0], [1.0, 0.0]].
    """
    v = rollout_rewards.float().mean(1)                                     # [P]
    return torch.where(index >= 0, v[index.clamp(min=0)], torch.zeros(()))


def chain_advantages(values: torch.Tensor, rewards: torch.Tensor, starts: torch.Tensor,
                     completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment advantages V_hat_{k+1} - V_hat_k, and the same spread over each segment's tokens.

        A_k = V_hat_{k+1} - V_hat_k,  k < K_b;  the closing value V_hat_{K_b} = R_b (own reward)
        A_t = A_k  for starts[k] <= t < starts[k+1] (the last segment runs to the end)
        A_t = 0    before the first start (those tokens have p >= rho), on padding, if K_b = 0
        telescoping: sum_k A_k = R_b - V_hat_0

    values [B, K_max] (mc_values), rewards [B], starts [B, K_max] (-1 padded), completion_mask
    [B, L]. Returns (segment advantages [B, K_max], token advantages [B, L]), fp32 or fp64.
    Example: starts [1, 5, 8], V_hat = [0.5, 0.75, 0.25], R = 1 -> A_k = [0.25, -0.5,
    0.75] (sum 0.5 = R - V_hat_0); A_t = [0, .25, .25, .25, .25, -.5, -.5, -.5, .75, .75].
    """
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    B, K = starts.shape
    valid = starts >= 0                                                     # [B, K]
    is_last = torch.arange(K)[None, :] == (valid.sum(1) - 1)[:, None]      # [B, K]
    nxt = torch.cat([values[:, 1:], values.new_zeros(B, 1)], 1)            # V_hat_{k+1}
    nxt = torch.where(is_last, rewards.to(values.dtype)[:, None], nxt)     # the closing value R
    seg = torch.where(valid, nxt - values, values.new_zeros(()))           # [B, K]
    pos = torch.arange(completion_mask.size(1))[None, :, None]             # [1, L, 1]
    k_of_t = (valid[:, None, :] & (starts[:, None, :] <= pos)).sum(-1) - 1  # [B, L]; -1: before
    tok = seg.gather(1, k_of_t.clamp(min=0)) if K > 0 else values.new_zeros(completion_mask.shape)
    keep = (k_of_t >= 0) & (completion_mask > 0)
    return seg, torch.where(keep, tok, values.new_zeros(()))               # [B, K], [B, L]


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the advantage, SPO-tree. A tree is flat: node 0 is the root (the prompt),
# parent[0] = -1, and every node comes after its parent (the order the levels are grown in).
# ----------------------------------------------------------------------------------------


def tree_node_values(parent: torch.Tensor, leaf_rewards: torch.Tensor) -> torch.Tensor:
    """A leaf's value is its reward; an inner node's value is the MEAN OF ITS CHILDREN.

        V(leaf) = R(prompt + path);   V(n) = (1/|Ch(n)|) sum_{c in Ch(n)} V(c)   (not the leaf mean)

    parent [N] (parent[i] < i), leaf_rewards [N] (read at childless nodes). Returns V [N].
    Examples: root -> {a, b}, a -> {1, 1}, b -> {1, 0}: V(a) = 1, V(b) = 0.5,
    V(root) = 0.75. root -> {a = leaf 1, b -> {1, 0, 0}}: V(b) = 1/3, V(root) = 2/3, not 1/2.
    Children valued 1, 2/3, 0 (the paper's figure): V(parent) = 5/9.
    """
    v = leaf_rewards.to(torch.promote_types(leaf_rewards.dtype, torch.float32)).clone()
    par = parent.tolist()
    sums, counts = [0.0] * len(par), [0] * len(par)
    for i in range(len(par) - 1, -1, -1):   # children come after parents: walk backwards
        if counts[i] > 0:
            v[i] = sums[i] / counts[i]      # every child of node i is final by now
        if i > 0:
            sums[par[i]] += v[i].item()
            counts[par[i]] += 1
    return v


def tree_advantages(parent: torch.Tensor, values: torch.Tensor,
                    normalized: bool = False) -> torch.Tensor:
    """A node's advantage: its value minus its parent's (= minus the mean of its siblings).

        A(n) = V(n) - V(parent(n))                               default (the official code)
        A(n) = (V(n) - V(parent(n))) / (std_sib + 1e-8)          normalized; population std
        A(root) = 0; siblings that all have the same value get A = 0 EXACTLY (no rounding residue)

    parent [N], values [N] (tree_node_values). Returns A [N].
    Example: root -> {a, b}, a -> {1, 1}, b -> {1, 0}: A(a) = +0.25, A(b) = -0.25,
    A(b1) = +0.5, A(b2) = -0.5, a's children 0. Normalized: A(a) = +1, A(b) = -1 (std 0.25).
    """
    adv = torch.zeros_like(values)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parent.tolist()[1:], start=1):
        children.setdefault(p, []).append(i)
    for p, ch in children.items():
        sib = values[ch]
        if sib.max() == sib.min():
            continue  # equal siblings: nothing to prefer, and no 0/0 in the normalized form
        diff = sib - values[p]
        adv[ch] = diff / (sib.std(unbiased=False) + 1e-8) if normalized else diff
    return adv


def tree_examples(parent: torch.Tensor, node_tokens: list[list[int]], advantages: torch.Tensor,
                  prompt_ids: list[int]) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """One training example per non-root node with A(n) != 0 (zero-advantage nodes are dropped).

        context = prompt + the tokens of the node's ancestors;  response = the node's own tokens
        (a leaf's include its EOS);  advantage A(n) on every response token

    Example: prompt [1], root -> {a = [2, 3] -> {[4], [5]}, b = [6]}, A = (0, .25, -.25, .5, -.5)
    for (root, a, b, a1, a2) -> ([1], [2, 3], .25), ([1], [6], -.25), ([1, 2, 3], [4], .5), ...
    """
    par, adv = parent.tolist(), advantages.tolist()
    path = {0: list(prompt_ids)}                # prompt + tokens from the root down to node i
    contexts, responses, advs = [], [], []
    for i in range(1, len(par)):
        path[i] = path[par[i]] + list(node_tokens[i])
        if adv[i] != 0.0:
            contexts.append(path[par[i]])
            responses.append(list(node_tokens[i]))
            advs.append(adv[i])
    return contexts, responses, advs


def segment_batch(examples: list[dict], pad_id: int, device=None) -> tuple[torch.Tensor, ...]:
    """Tree segments in the layout every loss here expects: contexts left-padded like prompts,
    the segments' own tokens right-padded like completions.

        prompt_ids, prompt_mask [E, C]     context = prompt + ancestors' tokens
        completion_ids, completion_mask [E, L]   mask 1 on the segment's tokens (a leaf's EOS too)
        advantages [E, L] = A(n) on every token of the segment;  old_logps [E, L] (0 if not stored)

    Example: contexts [[1], [1, 2, 3]], responses [[6], [4, 5]], A = [-.25, .5], pad 0 ->
    prompt_ids [[0, 0, 1], [1, 2, 3]], completion_ids [[6, 0], [4, 5]], mask [[1, 0], [1, 1]],
    advantages [[-.25, 0], [.5, .5]].
    """
    E = len(examples)
    C = max((len(e["context"]) for e in examples), default=1)
    L = max((len(e["response"]) for e in examples), default=1)
    prompt_ids = torch.full((E, C), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(E, C, dtype=torch.long)
    completion_ids = torch.full((E, L), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(E, L)
    advantages, old_logps = torch.zeros(E, L), torch.zeros(E, L)
    for i, e in enumerate(examples):
        c, r = len(e["context"]), len(e["response"])
        prompt_ids[i, C - c:], prompt_mask[i, C - c:] = torch.tensor(e["context"]), 1
        completion_ids[i, :r], completion_mask[i, :r] = torch.tensor(e["response"]), 1.0
        advantages[i, :r] = e["advantage"]
        if "old_logps" in e:
            old_logps[i, :r] = e["old_logps"]
    out = (prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, old_logps)
    return tuple(t.to(device) for t in out)


def tree_path_tokens(tree: dict, node: int) -> list[int]:
    """The whole response from the root down to `node` (its tokens included), for printing."""
    chunks = []
    while node > 0:
        chunks.append(tree["tokens"][node])
        node = tree["parent"][node]
    return [t for chunk in reversed(chunks) for t in chunk]


def draw_replay(buffer: list[dict], step: int, max_age: int, per_question: int,
                rng: random.Random) -> tuple[list[dict], list[dict]]:
    """The tree's replay buffer: drop stale segments, then draw up to `per_question` per question.

        keep e  iff  step - e["step"] < max_age;   drawn segments leave the buffer (trained once)

    buffer: dicts with at least "question" and "step". Returns (drawn, still waiting).
    Example: max_age 8, per_question 2, question 5 has 3 segments from this step -> 2 drawn, 1 waits
    (until step + 7); a segment from step - 8 is dropped. max_age 1 = on-policy (no waiting).
    """
    fresh = [e for e in buffer if step - e["step"] < max_age]
    by_question: dict[int, list[dict]] = {}
    for e in fresh:
        by_question.setdefault(e["question"], []).append(e)
    drawn_ids: set[int] = set()
    for group in by_question.values():
        drawn_ids.update(id(e) for e in rng.sample(group, min(per_question, len(group))))
    drawn = [e for e in fresh if id(e) in drawn_ids]
    # a segment that cannot be drawn before it goes stale is dropped now, not carried
    waiting = [e for e in fresh if id(e) not in drawn_ids and step + 1 - e["step"] < max_age]
    return drawn, waiting


# ----------------------------------------------------------------------------------------
# Sampling for the value estimates: a few batched, KV-cached generate calls (uses the model)
# ----------------------------------------------------------------------------------------


def _cut_at_eos(row: list[int], eos_id: int, budget: int) -> tuple[list[int], bool]:
    """A generated row's tokens up to its first EOS (kept) or its budget; finished = EOS seen."""
    row = row[:budget]
    return (row[:row.index(eos_id) + 1], True) if eos_id in row else (row, False)


def mc_stream_key(seed: int, prefix: PrefixKey, j: int) -> int:
    """The random-stream key of a boundary state's j-th MC continuation (stable across runs)."""
    return zlib.crc32(f"{seed}:{prefix[0]}:{','.join(map(str, prefix[1]))}:{j}".encode())


@torch.no_grad()
def mc_rollout_rewards(model, tokenizer, prefixes: list[PrefixKey], prompt_ids: list[list[int]],
                       answers: list[str], num_rollouts: int, max_completion_length: int,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       batch_size: int = 512, greedy: bool = False,
                       reward_fn: Optional[Callable] = None,
                       seed: int = 0) -> tuple[torch.Tensor, int]:
    """N continuations of every boundary state, scored by the verifier (SPO-chain's Monte Carlo).

        input_p  = prompt_ids[prompt of p] + prefix tokens of p      (ids end to end, never text)
        tau_pj   ~ pi_old(. | input_p),  at most max_completion_length - len(prefix) new tokens
        R_pj     = reward_fn(decode(prefix + tau_pj), answer)  if tau_pj ends in EOS, else 0

    The budget gives a continued response the same length limit as the original. Prefixes are
    sorted by length and cut into calls of about batch_size rows (little padding). In a call,
    a prefix is encoded once for its N continuations, and a continuation leaves the batch when
    it ends (common.generate_continuations). Continuation j of prefix p draws from its own
    random stream, keyed by (seed, p's prompt index, p's tokens, j) (common.KeyedSampler), so
    a prefix's values do not depend on which other prefixes share its call: batched equals
    one-at-a-time, sample for sample (tested).
    greedy=True repeats each row's argmax continuation N times.
    Returns rewards [P, N] (fp32, row p = prefixes[p]) and the continuation tokens generated.
    Example: prefixes [(0, ()), (0, (7, 8))], N = 2 -> 2 prefix rows, each continued twice.
    """
    device = next(model.parameters()).device
    eos, P, N = tokenizer.eos_token_id, len(prefixes), num_rollouts
    rewards, tokens = torch.zeros(P, N), 0
    order = sorted(range(P), key=lambda p: len(prefixes[p][1]))
    per_call = max(1, batch_size // N)
    for s in range(0, P, per_call):
        chunk = order[s:s + per_call]
        rows = [prompt_ids[prefixes[p][0]] + list(prefixes[p][1]) for p in chunk]
        if greedy:  # one argmax row per prefix, to the shortest prefix's budget (cut below)
            ids, mask = common.left_pad(rows, tokenizer.pad_token_id, device)
            budget = max_completion_length - len(prefixes[chunk[0]][1])
            out = common.generate(model, tokenizer, ids, mask, budget, greedy=True).cpu()
            out = out.repeat_interleave(N, 0).tolist()
        else:  # N rows per prefix, each with its own stream, sharing the prefix's prefill
            keys = [mc_stream_key(seed, prefixes[p], j) for p in chunk for j in range(N)]
            out = common.generate_continuations(
                model, tokenizer, rows, N, [max_completion_length - len(prefixes[p][1])
                                            for p in chunk], keys, temperature, top_p, top_k)
        texts, finished = [], []
        for r, row in enumerate(out):                         # row r = (chunk[r // N], j = r % N)
            prefix = list(prefixes[chunk[r // N]][1])
            cont, done = _cut_at_eos(row, eos, max_completion_length - len(prefix))
            tokens += len(cont)
            texts.append(tokenizer.decode(prefix + cont, skip_special_tokens=True))
            finished.append(done)
        golds = [answers[prefixes[p][0]] for p in chunk for _ in range(N)]
        scores = torch.tensor((reward_fn or common.reward_fn)(texts, golds), dtype=torch.float32)
        scores = scores * torch.tensor(finished, dtype=torch.float32)
        rewards[chunk] = scores.view(len(chunk), N)                   # unfinished -> 0
    return rewards, tokens


@torch.no_grad()
def grow_trees(model, tokenizer, prompt_ids: list[list[int]], answers: list[str],
               branching: list[int], segment_length: int, max_completion_length: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               batch_size: int = 512,
               reward_fn: Optional[Callable] = None) -> tuple[list[dict], int]:
    """SPO-tree's sampling: one tree per prompt, grown level by level in batched generate calls.

        level d: every open node (all prompts at once) gets branching[d] children of M new tokens
                 (the last level: up to max_completion_length - d*M tokens)
        a child that emits EOS is a leaf, graded on prompt + path;  a child that reaches M
        tokens is expanded at the next level (the official code's rule; the paper's Algorithm 1
        swaps the two); at the last level, or at the length limit, it is an unfinished leaf (0)

    Returns one dict per prompt of lists indexed by node (node 0 = the root): "parent", "tokens"
    (the node's own ids), "reward" (read at leaves), "depth", "length" (response tokens from the
    root through the node), "finished" (ends in EOS); and the number of tokens generated.
    Example: branching [2], M = 3, children [5, EOS] and [6, 7, 8] with no EOS -> parent
    [-1, 0, 0], the first a graded leaf, the second an unfinished leaf (last level) with 0.
    """
    device, eos = next(model.parameters()).device, tokenizer.eos_token_id
    trees = [{"parent": [-1], "tokens": [[]], "reward": [0.0], "depth": [0], "length": [0],
              "finished": [False]} for _ in prompt_ids]
    frontier = [(t, 0, []) for t in range(len(prompt_ids))]      # (tree, node, tokens so far)
    generated = 0
    for d, width in enumerate(branching):
        last = d == len(branching) - 1
        room = max_completion_length - d * segment_length        # every open node has d*M tokens
        budget = room if last else min(segment_length, room)
        graded, next_frontier = [], []
        per_call = max(1, batch_size // width)
        for s in range(0, len(frontier), per_call):
            chunk = frontier[s:s + per_call]
            ids, mask = common.left_pad([prompt_ids[t] + path for t, _, path in chunk],
                                        tokenizer.pad_token_id, device)
            out = common.generate(model, tokenizer, ids, mask, budget, width, temperature, top_p,
                                  top_k).cpu()
            for r, row in enumerate(out.tolist()):           # row r is a child of chunk[r // width]
                t, node, path = chunk[r // width]
                toks, done = _cut_at_eos(row, eos, budget)
                tree = trees[t]
                for key, value in (("parent", node), ("tokens", toks), ("reward", 0.0),
                                   ("depth", d + 1), ("length", len(path) + len(toks)),
                                   ("finished", done)):
                    tree[key].append(value)
                generated += len(toks)
                child = (t, len(tree["parent"]) - 1, path + toks)
                if done:
                    graded.append(child)
                elif not last and len(path) + len(toks) < max_completion_length:
                    next_frontier.append(child)
        texts = [tokenizer.decode(p, skip_special_tokens=True) for _, _, p in graded]
        scores = (reward_fn or common.reward_fn)(texts, [answers[t] for t, _, _ in graded])
        for (t, node, _), r in zip(graded, scores):
            trees[t]["reward"][node] = r
        frontier = next_frontier
        if not frontier:
            break
    return trees, generated


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the loss
# ----------------------------------------------------------------------------------------


def clipped_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (to MAXIMISE), and the ratio.

        rho = exp(clamp(logp - old_logp, -20, 20))
        s   = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)

    logps, old_logps: [B, L]; advantages: [B, L] (or broadcastable). Returns (s, rho), [B, L].
    Example, eps 0.2: A=+1, rho=1.5 -> s=1.2 (clipped, no gradient); A=-1, rho=1.5 -> s=-1.5
    (not clipped: the min keeps the pessimistic side); A=+1, rho=1.25, eps_high=0.28 -> 1.25.
    The clamp of the log-ratio changes nothing inside the clip region; it stops inf * 0.
    """
    ratio = torch.exp((logps - old_logps).clamp(-20.0, 20.0))
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    return torch.min(ratio * advantages, clipped * advantages), ratio


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref), per token.

        d = log pi_ref - log pi_theta;   k3 = exp(d) - d - 1   (>= 0, 0 iff equal)

    Example: pi_theta=0.5, pi_ref=0.25 -> d = -ln 2 -> 0.5 + ln 2 - 1 = 0.1931472.
    """
    d = (ref_logps - logps).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def whiten_advantages(advantages: torch.Tensor, prob_mask: torch.Tensor,
                      eps: float = 1e-8) -> torch.Tensor:
    """OPTIONAL (--whiten-advantages; the official code, not the paper): whiten over kept tokens.

        mu = sum(M A) / sum(M);   var = sum(M (A - mu)^2) / (sum(M) - 1)
        A' = (A - mu) / sqrt(var + eps)

    advantages, prob_mask: [b, L] (one micro-batch). Fewer than 2 kept tokens: A unchanged.
    Example: A = [1, 3, 100], M = [1, 1, 0] -> mu 2, var 2 -> [-0.7071, 0.7071, 69.30].
    """
    z = prob_mask.sum()
    if z < 2:
        return advantages
    mu = (advantages * prob_mask).sum() / z
    var = (((advantages - mu) * prob_mask) ** 2).sum() / (z - 1)
    return (advantages - mu) / torch.sqrt(var + eps)


def spo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
             prob_mask: torch.Tensor, *, epsilon_low: float, epsilon_high: float,
             num_masked_tokens: float, beta: float = 0.0,
             ref_logps: Optional[torch.Tensor] = None,
             completion_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """The SPO loss of one micro-batch: PPO's clip on the probability-masked tokens only.

        L = -(1/Z) sum_t M_t * s_t  (+ (beta/Z) sum_t m_t * k3_t  only if beta > 0)
        s_t = clipped_objective(logp, old_logp, A);   Z = sum M over the WHOLE optimizer step,
        so micro-batches add up to the full-step loss; Z = 0 -> loss 0 (the loop skips the step)

    logps, old_logps, advantages, prob_mask, ref_logps, completion_mask: [b, L]. No advantage
    normalisation happens here. Masked positions may hold garbage: they are zeroed before use.
    Example: ratio 1, A = [0, .25, .25, .25, .25, -.5, -.5, -.5, .75, .75], M = [0, 1,
    0, 1, 0, 1, 1, 0, 1, 0], Z = 5 -> L = -(.25 + .25 - .5 - .5 + .75) / 5 = -0.05.
    """
    keep = prob_mask > 0                                                     # [b, L]
    zero = torch.zeros_like(logps)
    s, ratio = clipped_objective(torch.where(keep, logps, zero), torch.where(keep, old_logps, zero),
                                 torch.where(keep, advantages.to(logps.dtype), zero), epsilon_low,
                                 epsilon_high)
    per_token_loss = -s * prob_mask
    if beta > 0.0:  # on every completion token, as grpo.py (the official code masks it too)
        m = completion_mask > 0
        kl = k3_kl(torch.where(m, logps, zero), torch.where(m, ref_logps, zero))
        per_token_loss = per_token_loss + beta * kl * completion_mask
    loss = per_token_loss.sum() / max(num_masked_tokens, 1.0)   # Z = 0: every term is 0, never 0/0

    with torch.no_grad():  # metrics, averaged over the micro-batch's kept tokens
        n = prob_mask.sum().clamp(min=1.0)
        adv = torch.where(keep, advantages.to(logps.dtype), zero)
        low = ((adv < 0) & (ratio < 1 - epsilon_low)).float()
        high = ((adv > 0) & (ratio > 1 + epsilon_high)).float()
        metrics = {"clip_ratio/low_mean": (low * prob_mask).sum() / n,
                   "clip_ratio/high_mean": (high * prob_mask).sum() / n,
                   "clip_ratio/region_mean": ((low + high) * prob_mask).sum() / n,
                   "approx_kl_old": (k3_kl(torch.where(keep, logps, zero),
                                           torch.where(keep, old_logps, zero))
                                     * prob_mask).sum() / n,
                   "policy_loss": loss.detach()}
        if beta > 0.0:
            metrics["kl"] = (kl * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    return loss, {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------
# ALGO LOGIC: the two rollout builders. Each samples, runs the no-grad pass for the old
# log-probs and computes the advantages; both return one SpoBatch, so the update is written once
# ----------------------------------------------------------------------------------------


@dataclass
class SpoBatch:
    """What SPO's update trains on, whichever variant built it: E rows, each a context and the
    tokens after it, with one advantage per token (the one layout of spo.py).

        prompt_ids, prompt_mask          [E, C]  left-padded contexts. chain: the prompt;
                                                 tree: the prompt + the segment's ancestors
        completion_ids, completion_mask  [E, L]  right-padded. chain: a whole response;
                                                 tree: one segment (a leaf's EOS included)
        old_logps                        [E, L]  log-probs under the weights that sampled the row
        advantages                       [E, L]  chain: its segment's A on every token; tree: A(n)
        prob_mask                        [E, L]  1 on the tokens the loss keeps (p_old < rho)
        segment_start                    [E, L]  True where a segment starts (for --show-credit)
        entropy                          mean entropy of the newly sampled tokens (no-grad pass)
        rollout                          reward and length metrics of the step's whole responses
        algo_metrics                     spo/* metrics of the builder
        texts, rewards                   whole responses and their rewards; the first
                                         group_size are one prompt's, for completions.jsonl
        gen_seconds, mc_seconds          sampling time, and the part of it spent on the values
    """
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    prob_mask: torch.Tensor
    segment_start: torch.Tensor
    entropy: float
    rollout: dict
    algo_metrics: dict
    texts: list[str]
    rewards: torch.Tensor
    group_size: int
    gen_seconds: float
    mc_seconds: float


class ReplayBuffer:
    """SPO-tree's segments waiting to be trained on (draw_replay), saved with every checkpoint."""

    def __init__(self):
        self.segments: list[dict] = []

    def state_dict(self) -> list[dict]:
        return self.segments

    def load_state_dict(self, state: list[dict]) -> None:
        self.segments = list(state)


def old_logps_and_entropies(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                            temperature: float, micro_batch_size: int):
    """One no-grad pass (common.no_grad_pass): log-probs and entropies [E, L] of every row."""
    def fwd(m, mb, with_entropy=False):
        return common.per_token_logps(m, prompt_ids[mb], prompt_mask[mb], completion_ids[mb],
                                      completion_mask[mb], temperature, with_entropy)

    mbs = [slice(s, s + micro_batch_size) for s in range(0, len(completion_ids), micro_batch_size)]
    logps, entropies, _ = common.no_grad_pass(fwd, mbs, model)
    return logps, entropies


def chain_batch(model, tokenizer, args, prompts: list[list[int]], answers: list[str], device,
                max_len: int, num_rollouts: int, sample_kw: dict) -> SpoBatch:
    """SPO-chain: G responses per prompt, cut at low-probability tokens, MC values per cut."""
    t0, G, eos = time.time(), args.num_generations, tokenizer.eos_token_id
    B = G * len(prompts)
    # ---- rollout: G completions for each of P prompts, one batched generate call ----
    prompt_ids, prompt_mask = common.left_pad(prompts, tokenizer.pad_token_id, device)
    completion_ids = common.generate(model, tokenizer, prompt_ids, prompt_mask, max_len, G,
                                     args.temperature, args.top_p, args.top_k)
    prompt_ids = prompt_ids.repeat_interleave(G, 0)
    prompt_mask = prompt_mask.repeat_interleave(G, 0)
    completion_mask = common.completion_mask_from_ids(completion_ids, eos)              # [B, L]
    texts = common.decode_completions(tokenizer, completion_ids)
    # an unfinished response scores 0, like an unfinished MC continuation (paper)
    rewards = common.finished_rewards(texts, [a for a in answers for _ in range(G)],
                                      completion_ids, eos)
    t_gen = time.time() - t0
    # ---- old log-probs: one no-grad forward BEFORE the advantages ----
    # grpo.py takes pass 1's log-probs as the old ones, since its advantages never look at
    # them. SPO's cutpoints are the tokens with pi_old < rho, so the advantages need them
    # first. Same weights, same layout: pass 1 of the update still sees ratio == 1 exactly.
    old_logps, entropies = old_logps_and_entropies(model, prompt_ids, prompt_mask,
                                                   completion_ids, completion_mask,
                                                   args.temperature, args.micro_batch_size)
    # ---- segments, their MC values, and the advantages ----
    prob_mask = probability_mask(old_logps, completion_mask, args.rho)                 # [B, L]
    starts = segment_starts(prob_mask.cpu() > 0, args.cutpoint_interval, args.partition)  # [B, K]
    prefixes, index = plan_mc_prefixes(completion_ids.cpu(), starts, torch.arange(B) // G)
    t_mc = time.time()
    mc_seed = int(torch.randint(2**31 - 1, (1,)).item())  # from the global RNG: resumes exactly
    mc_rewards, mc_tokens = mc_rollout_rewards(model, tokenizer, prefixes, prompts, answers,
                                               num_rollouts, max_len, **sample_kw,
                                               seed=mc_seed)                         # [P', N]
    t_mc = time.time() - t_mc
    values = mc_values(mc_rewards, index)                                              # [B, K]
    seg_adv, advantages = chain_advantages(values, rewards, starts, completion_mask.cpu())
    segs, seg_abs = (starts >= 0).sum(1).float(), seg_adv[starts >= 0].abs()
    some = seg_abs.numel() > 0
    algo_metrics = {
        "spo/segments_per_response": segs.mean().item(),
        "spo/segments_per_response_max": segs.max().item(),
        "spo/cutpoints_per_response": prob_mask.sum(1).mean().item(),
        "spo/mc_rollouts": mc_rewards.numel(), "spo/mc_tokens": mc_tokens,
        "spo/mc_dedup_saved": int((starts >= 0).sum()) - len(prefixes),
        "spo/v_hat_std": mc_rewards.std(1, unbiased=False).mean().item() if len(prefixes) else 0.0,
        "spo/seg_adv_abs_mean": seg_abs.mean().item() if some else 0.0,
        "spo/seg_adv_zero_frac": (seg_abs == 0).float().mean().item() if some else 0.0}
    segment_start = torch.zeros(completion_ids.shape, dtype=torch.bool)
    rows, cols = (starts >= 0).nonzero(as_tuple=True)
    segment_start[rows, starts[rows, cols]] = True
    return SpoBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, old_logps,
                    advantages.to(device), prob_mask, segment_start,
                    common.masked_mean(entropies, completion_mask),
                    common.rollout_metrics(rewards, completion_ids, completion_mask, eos, G),
                    algo_metrics, texts, rewards, G, t_gen, t_mc)


def tree_batch(model, tokenizer, args, prompts: list[list[int]], answers: list[str], device,
               idx: list[int], step: int, replay: ReplayBuffer, branching: list[int],
               segment_length: int, max_len: int, sample_kw: dict) -> SpoBatch:
    """SPO-tree: one tree per prompt; each node with A != 0 is a segment to train on."""
    t0, pad = time.time(), tokenizer.pad_token_id
    # ---- rollout: one tree per prompt, grown level by level (one batched call per level) ----
    trees, mc_tokens = grow_trees(model, tokenizer, prompts, answers, branching, segment_length,
                                  max_len, **sample_kw)
    t_gen = time.time() - t0
    # ---- node values and advantages; one segment per node with A != 0 ----
    new = []
    for q, prompt, tree in zip(idx, prompts, trees):
        parent = torch.tensor(tree["parent"])
        values = tree_node_values(parent, torch.tensor(tree["reward"]))
        adv = tree_advantages(parent, values, args.tree_adv == "normalized")
        for ctx, resp, a in zip(*tree_examples(parent, tree["tokens"], adv, prompt)):
            new.append({"question": q, "step": step, "context": ctx, "response": resp,
                        "advantage": a})
    drawn, replay.segments = draw_replay(replay.segments + new, step, args.tree_replay_iters,
                                         args.tree_replay_per_question, random)
    # ---- old log-probs: a no-grad forward over the new segments, stored with them ----
    # A replayed segment keeps the log-probs of the weights that sampled it: its ratio
    # drifts from 1 over the steps it waits, and the clip handles that.
    todo = [e for e in drawn + replay.segments if "old_logps" not in e]
    entropy = 0.0
    if todo:
        p_ids, p_mask, c_ids, c_mask, _, _ = segment_batch(todo, pad, device)
        lp, ent = old_logps_and_entropies(model, p_ids, p_mask, c_ids, c_mask,
                                          args.temperature, args.micro_batch_size)
        entropy = common.masked_mean(ent, c_mask)
        for e, row in zip(todo, lp.cpu()):
            e["old_logps"] = row[:len(e["response"])].clone()
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, old_logps = \
        segment_batch(drawn, pad, device)                                               # [E, L]
    prob_mask = probability_mask(old_logps, completion_mask, args.rho)                  # [E, L]
    leaves = [(t, i) for t in trees for inner in [set(t["parent"])]
              for i in range(1, len(t["parent"])) if i not in inner]
    leaf = {k: torch.tensor([float(t[k][i]) for t, i in leaves])
            for k in ("reward", "depth", "finished", "length")}
    algo_metrics = {
        "spo/tree_nodes": sum(len(t["parent"]) for t in trees) / len(prompts),
        "spo/mc_rollouts": len(leaves), "spo/mc_tokens": mc_tokens,
        "spo/early_leaf_frac": (leaf["depth"] < len(branching)).float().mean().item(),
        "spo/nonzero_segments": len(new) / len(prompts), "spo/trained_segments": len(drawn),
        "spo/replay_size": len(replay.segments),
        "spo/replay_age_mean": sum(step - e["step"] for e in drawn) / max(len(drawn), 1),
        "spo/seg_adv_abs_mean": sum(abs(e["advantage"]) for e in new) / max(len(new), 1)}
    rollout = {"reward": leaf["reward"].mean().item(),
               "accuracy": (leaf["reward"] > 0.5).float().mean().item(),
               "completions/mean_length": leaf["length"].mean().item(),
               "completions/clipped_ratio": 1.0 - leaf["finished"].mean().item()}
    first = trees[0]  # the first tree's leaves, as whole responses, are the step's samples
    first_leaves = [i for t, i in leaves if t is first]
    texts = [tokenizer.decode(tree_path_tokens(first, i), skip_special_tokens=True)
             for i in first_leaves]
    segment_start = torch.zeros(completion_ids.shape, dtype=torch.bool)
    segment_start[:, 0] = True
    return SpoBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, old_logps,
                    advantages, prob_mask, segment_start, entropy, rollout, algo_metrics, texts,
                    torch.tensor([first["reward"][i] for i in first_leaves]), len(texts),
                    t_gen, t_gen)


# ----------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    # ---- setup (boilerplate) ----
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)  # compute dtype: bf16 on a GPU that has it
    autocast = common.autocast(device, dtype)        # `with autocast():` computes in it
    max_len = (common.default_max_len(args.task, args.arith_ops)
               if args.max_completion_length is None else args.max_completion_length)
    lr = ((TINY_LEARNING_RATE if args.model == common.TINY else HUB_LEARNING_RATE)
          if args.learning_rate is None else args.learning_rate)
    G, P = args.num_generations, args.prompts_per_step
    B = G * P

    train = common.load_task(args.task, "train", args.data_dir, args.arith_ops)
    heldout = common.load_task(args.task, "test", args.data_dir, args.arith_ops)[: args.eval_size]
    common.seed_everything(args.seed)
    # fp32 master weights: AdamW's small updates would round away in bf16 (common.autocast)
    model, tokenizer = common.load_model_and_tokenizer(args.model, device, torch.float32,
                                                       args.arith_ops)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    eos = tokenizer.eos_token_id
    train_prompt_ids = common.tokenize_prompts(tokenizer, train, args.task,
                                               common.context_length(model), max_len)
    ref_model = None  # with beta == 0, no reference model is ever built
    if args.beta > 0.0:  # frozen: it never steps, so it is stored in the compute dtype
        ref_model = common.load_frozen(args.model, device, dtype, args.arith_ops)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sampler = common.PromptSampler(len(train), args.seed)

    # ---- ALGO LOGIC: the method's state across steps, and its sampling settings ----
    replay = ReplayBuffer()                             # SPO-tree's segments waiting their turn
    algo_state = {"replay": replay}
    tiny = args.model == common.TINY
    N = ((TINY_NUM_ROLLOUTS if tiny else HUB_NUM_ROLLOUTS) if args.num_rollouts is None
         else args.num_rollouts)
    M = ((TINY_TREE_SEGMENT_LENGTH if tiny else HUB_TREE_SEGMENT_LENGTH)
         if args.tree_segment_length is None else args.tree_segment_length)
    branching = [int(b) for b in args.tree_branching.split(",")]  # checked: see its "range"
    sample_kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     batch_size=args.mc_batch_size)

    run = common.Run(args, model, tokenizer, optimizer, sampler, algo_state)
    state = run.state  # step, start accuracy, and algo_state (restored on --resume)
    if "start_accuracy" not in state:
        with autocast():
            state["start_accuracy"] = common.evaluate(model, tokenizer, heldout, args.task,
                                                      max_len)
        run.logger.log(0, {"eval/accuracy": state["start_accuracy"]})
    eval_acc, t_start = state["start_accuracy"], time.time()

    bar = common.progress(range(state["step"] + 1, args.total_steps + 1), run.algo)
    for step in bar:
        t0 = time.time()
        # ---- 1.-3. ALGO LOGIC: rollout, old log-probs (no-grad pass), advantages ----
        # by the variant's builder; both return one SpoBatch (its docstring is the layout)
        idx = sampler.next(P)
        prompts, answers = [train_prompt_ids[i] for i in idx], [train[i]["answer"] for i in idx]
        with autocast():  # the builders only sample and run no-grad passes
            if args.variant == "chain":
                batch = chain_batch(model, tokenizer, args, prompts, answers, device, max_len, N,
                                    sample_kw)
            else:
                batch = tree_batch(model, tokenizer, args, prompts, answers, device, idx, step,
                                   replay, branching, M, max_len, sample_kw)
        prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
        completion_ids, completion_mask = batch.completion_ids, batch.completion_mask
        old_logps, advantages, prob_mask = batch.old_logps, batch.advantages, batch.prob_mask
        algo_metrics, rollout, t_gen = batch.algo_metrics, batch.rollout, batch.gen_seconds
        texts, rewards = batch.texts, batch.rewards
        if args.show_credit and step % args.show_credit == 0 and args.variant == "chain":
            toks = [[("|" if s else "") + tokenizer.decode([tok]) for s, tok in zip(*row)]
                    for row in zip(batch.segment_start.tolist(), completion_ids.tolist())]
            bar.write(common.credit_group_text(step, train, idx, rewards, G, lambda g: (
                "'|' starts a segment; only the tokens SPO trains (p < rho) are marked:\n"
                "key: x[+0.12] = the advantage of token x, the token just before the [ ] (on a "
                "terminal its colour instead: green > 0, red < 0)\n"
                + common.render_credit(toks[g], advantages[g], completion_mask[g],
                                       color=sys.stdout.isatty(), rewards=rewards[g],
                                       marks=prob_mask[g] > 0))))

        # ---- 4. ALGO LOGIC: optimisation passes on the masked tokens, against pi_old ----
        num_tokens = prob_mask.sum().item()             # Z of the whole optimizer step
        algo_metrics["spo/mask_keep_frac"] = num_tokens / max(completion_mask.sum().item(), 1.0)
        # A row whose kept tokens all have A = 0 adds exactly 0 to the loss and its gradient
        # (beta = 0, no whitening), so it skips the passes; Z still counts its kept tokens.
        live = ((prob_mask * advantages != 0).any(1) | (args.beta > 0.0)
                | args.whiten_advantages)                                              # [E]
        rows = live.nonzero().squeeze(1)
        algo_metrics["spo/trained_rows"] = len(rows)
        mbs = [rows[s:s + args.micro_batch_size]
               for s in range(0, len(rows), args.micro_batch_size)]

        def fwd(m, mb, with_entropy=False):  # log-probs [b, L] (and entropies) of rows mb under m
            with autocast():
                return common.per_token_logps(m, prompt_ids[mb], prompt_mask[mb],
                                              completion_ids[mb], completion_mask[mb],
                                              args.temperature, with_entropy)

        ref_logps = None  # beta > 0: one [b, L] tensor per micro-batch, for all passes
        if ref_model is not None:
            with torch.no_grad():
                ref_logps = [fwd(ref_model, mb)[0] for mb in mbs]
        avg = common.MetricAverager()
        grad_norm, skip = 0.0, not mbs          # Z = 0 or every A = 0: nothing to learn, no step
        if skip:
            avg.add({"policy_loss": 0.0}, weight=1.0)
        for it in range(0 if skip else args.num_iterations):
            for j, mb in enumerate(mbs):
                adv = advantages[mb]
                if args.whiten_advantages:
                    adv = whiten_advantages(adv, prob_mask[mb])
                loss, metrics = spo_loss(
                    fwd(model, mb)[0], old_logps[mb], adv, prob_mask[mb],
                    epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
                    num_masked_tokens=num_tokens, beta=args.beta,
                    ref_logps=None if ref_logps is None else ref_logps[j],
                    completion_mask=completion_mask[mb])
                loss.backward()
                avg.add(metrics, weight=prob_mask[mb].sum().item(),
                        last_pass=it == args.num_iterations - 1)
            grad_norm = common.optimizer_step(model, optimizer, args.max_grad_norm, avg)
        algo_metrics.update({"entropy": batch.entropy, "spo/skipped_step": float(skip),
                             "spo/mc_time_share": batch.mc_seconds / (time.time() - t0)})

        # ---- 5. log, evaluate, checkpoint (boilerplate) ----
        state["step"] = step
        metrics = dict(rollout)
        metrics.update(avg.means(), **algo_metrics, grad_norm=grad_norm, learning_rate=lr,
                       num_tokens=num_tokens, step_time=time.time() - t0,
                       generation_share=t_gen / (time.time() - t0))
        if step % args.eval_every == 0 or step == args.total_steps:
            with autocast():
                eval_acc = metrics["eval/accuracy"] = common.evaluate(model, tokenizer, heldout,
                                                                      args.task, max_len)
        run.end_step(step, metrics, texts, rewards, idx, train, batch.group_size)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", eval_acc=f"{eval_acc:.2f}")
        if step % args.save_every == 0 or step == args.total_steps or run.stop_requested:
            run.save(step)
        if run.stop_requested:
            common.close_bar(bar, args.total_steps - step)  # the bar shows this step as done
            break

    return run.finish(eval_acc, time.time() - t_start)


if __name__ == "__main__":
    common.run_main(main, Args)
