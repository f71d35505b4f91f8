"""Time the TEMPO prefix tree on CPU: one group of 64 responses x 1024 tokens.

Tokens are random over a small vocabulary (4 ids) after a shared 64-token prefix, so the group
branches right after the prefix and again for a few tokens after that (random tokens over 4 ids
make pairs of responses agree for ~1.3 tokens on average). Each response stops at a random EOS
in its second half or is truncated at 1024.

Run: OMP_NUM_THREADS=1 python benchmarks/perf/bench_tempo_tree.py   (from the repository root)
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import tempo  # noqa: E402

argparse.ArgumentParser(  # no options: --help prints the docstring
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

G, L, VOCAB, PREFIX, EOS, REPS = 64, 1024, 4, 64, 0, 20

torch.manual_seed(0)
ids = torch.randint(1, VOCAB, (G, L))  # [G, L] ids 1..3, EOS = 0 placed below
ids[:, :PREFIX] = ids[0, :PREFIX]  # shared prefix
stop = torch.randint(L // 2, L + 200, (G,))  # >= L means truncated (no EOS)
mask = torch.zeros(G, L)
for i in range(G):
    if stop[i] < L:
        ids[i, stop[i]] = EOS
        ids[i, stop[i] + 1:] = EOS  # pad == EOS
        mask[i, : stop[i] + 1] = 1.0
    else:
        mask[i] = 1.0
rewards = (torch.rand(G) < 0.5).float()


def timed(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def python_trie() -> None:
    """The textbook trie (counts and sums also kept per token in Python), for contrast:
    tempo.build_prefix_tree walks the same dict trie but only assigns node ids in Python."""
    child, cnt, tot = {}, [0], [0.0]
    for i in range(G):
        node = 0
        for tok in ids[i, : int(mask[i].sum())].tolist():
            node = child.setdefault((node, tok), len(cnt))
            if node == len(cnt):
                cnt.append(0)
                tot.append(0.0)
            cnt[node] += 1
            tot[node] += float(rewards[i])


tree = tempo.build_prefix_tree(ids, mask, rewards, G)
t_tree = timed(lambda: tempo.build_prefix_tree(ids, mask, rewards, G))
t_all = timed(lambda: tempo.compute_tempo_advantages(rewards, G, ids, mask))
t_py = timed(python_trie)
_, metrics = tempo.compute_tempo_advantages(rewards, G, ids, mask)
print(f"G={G} L={L} tokens={int(mask.sum())} nodes={len(tree.values)} "
      f"branching={int(tree.branching.sum())} threads={torch.get_num_threads()}")
print(f"build_prefix_tree          {t_tree * 1e3:7.2f} ms (median of {REPS})")
print(f"compute_tempo_advantages   {t_all * 1e3:7.2f} ms (tree + TD + advantage + metrics)")
print(f"card pseudocode (contrast)  {t_py * 1e3:7.2f} ms")
print({k: round(v, 4) for k, v in metrics.items()})
