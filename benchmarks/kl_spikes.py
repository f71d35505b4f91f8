"""Which tokens make a step's approx_kl_old large? Replays a grpo.py run and prints them.

approx_kl_old is the k3 estimate of KL(new || old) between the weights after the first update of
a step and the sampling weights, averaged over the step's tokens. One token whose log-prob moves
by d nats adds about e^|d| / num_tokens to it, so a mean of 6.7 can come from one token. This
script runs grpo.py exactly as given (same flags, so the same samples; on a CPU the run is
deterministic for a seed and thread count) and, on every pass after the first, prints each
token whose log-prob moved by more than --nats, with its completion.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/kl_spikes.py --nats 4 -- --seed 1 --total-steps 37

(the flags after -- are grpo.py's; 1 thread as in benchmarks/compare.py --jobs 2).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import grpo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nats", type=float, default=4.0, help="report tokens whose log-prob moved more than this")
    p.add_argument("grpo_args", nargs=argparse.REMAINDER, help="grpo.py's flags, after --")
    a = p.parse_args()
    argv = [x for x in a.grpo_args if x != "--"]
    seen = {"step": 0, "ids": None, "tokenizer": None}

    per_token_logps = common.per_token_logps

    def logps_spy(model, prompt_ids, prompt_mask, completion_ids, *rest, **kw):
        seen["ids"] = completion_ids
        return per_token_logps(model, prompt_ids, prompt_mask, completion_ids, *rest, **kw)

    grpo_loss = grpo.grpo_loss

    def loss_spy(logps, old_logps, advantages, completion_mask, **kw):
        d = ((logps.detach() - old_logps) * completion_mask).abs()
        for flat in (d.flatten() > a.nats).nonzero().flatten().tolist():
            i, t = divmod(flat, d.size(1))
            ids = seen["ids"][i][: int(completion_mask[i].sum())].tolist()
            tok = seen["tokenizer"]
            adv = advantages[i] if advantages.dim() == 1 else advantages[i, t]
            print(f"step {seen['step']}: token {t} {tok.decode(ids[t:t + 1])!r} of {tok.decode(ids)!r}: log-prob "
                  f"{old_logps[i, t].item():.2f} -> {logps[i, t].item():.2f} after one update, advantage "
                  f"{adv.item():+.3f}", flush=True)
        return grpo_loss(logps, old_logps, advantages, completion_mask, **kw)

    load = common.load_model_and_tokenizer

    def load_spy(*args, **kw):
        model, tok = load(*args, **kw)
        seen["tokenizer"] = tok
        return model, tok

    generate = common.generate

    def generate_spy(*args, **kw):  # one sampling call per step (evaluation is greedy)
        if not kw.get("greedy"):
            seen["step"] += 1
        return generate(*args, **kw)

    common.per_token_logps, grpo.grpo_loss = logps_spy, loss_spy
    common.load_model_and_tokenizer, common.generate = load_spy, generate_spy
    common.run_main(grpo.main, grpo.Args, argv)


if __name__ == "__main__":
    main()
