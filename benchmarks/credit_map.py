"""What does each method reward? One group of completions, one cell per token, one panel per method.

    python benchmarks/credit_map.py                        # the tiny model's warm start (2-4)
    python benchmarks/credit_map.py --arith-ops 6-8        # the warm start of the longer setting
    python benchmarks/credit_map.py --run runs/token_dpo__tiny__arith__0__1700000000
                                                           # a run folder: its last checkpoint

It samples G completions for training prompts (seeded order) until a group's rewards differ
(common.pick_credit_group), then computes, for that one group, what every method gives each
token, with each method's own functions imported from its script:

    GRPO       grpo.compute_advantages: one number per completion, on every token
    TEMPO      tempo.compute_tempo_advantages: GRPO's + the prefix tree's TD term
    SPO-chain  spo.probability_mask / segment_starts / mc_rollout_rewards / chain_advantages,
               times the mask (only tokens with p < rho are trained; the rest get 0)
    DCPO       dcpo.sas_advantages on a first visit (fresh statistics: a run's history is not saved
               with the weights), per completion
    TW-GRPO    grpo.tw_token_weights: the weight w_t in [1, 1.7] of each token, from the group's
               disagreement at index t (the padding effect shows where completions have ended)
    D3S        GRPO's advantage on the tokens D3S trains at its first step (grpo.d3s_select and
               grpo.d3s_token_mask, G/2 rollouts and 20% of their tokens by |A| * entropy), 0
               on the rest
    TDPO       token_dpo.token_logps_and_kl: the per-token KL(pi_ref || pi_theta) of its penalty
    TGDPO      the guidance token reward r_hat_t = beta (log pi_g - log pi_ref), pi_g = the run's
               guidance folder or --guidance-model
    cDPO       token_dpo.cdpo_weights (w_t = 1 - c_t) from its positive and negative models:
               --cdpo-models, else fitted here as token_dpo.py fits them in a round (fresh copies
               of the reference, token_dpo.train_ce_model, --cdpo-sft-steps steps) on the rows
               token_dpo.cdpo_sets picks from the batch the group was sampled in

MC truth     benchmarks/credit_truth.py's true advantage A*_t = V(y_<=t) - V(y_<t), from --truth-k
               keyed continuations of every distinct prefix (0 leaves the panel out): what
               every panel beside it approximates

The reference is the warm start of the setting. From the warm start itself, policy = reference,
so TDPO's KL is 0 on every token, and TGDPO has no guidance model yet (token_dpo.py's is the
policy after its first DPO round): both panels are left out with a note that names the --run to
pass. Writes OUT (default runs/credit_map/credit_map.png, under the ignored runs/) and OUT with
.json (the matrices, for the tests and for anyone who wants the numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import dcpo  # noqa: E402
import grpo  # noqa: E402
import spo  # noqa: E402
import tempo  # noqa: E402
import token_dpo  # noqa: E402

EOS_TEXT = "$"  # how EOS shows in a cell
EPILOG = """\
outputs: the PNG at --out (default runs/credit_map/credit_map.png) and the matrices beside it
  as .json (runs/credit_map/credit_map.json). The PNG needs matplotlib, which the project does
  not install: pip install -r benchmarks/requirements-plots.txt. Without it only the JSON is
  written.
panels that a warm start cannot fill (no --run: the policy is the reference):
  TDPO   its per-token KL is 0: pass --run RUN_DIR of a trained run (e.g. token_dpo.py --loss tdpo2)
  TGDPO  no guidance model: pass --run RUN_DIR of a token_dpo.py --loss tgdpo run that finished a
         round (its RUN_DIR/guidance), or --guidance-model DIR
"""


# ----------------------------------------------------------------------------------------
# The group and its matrices (tested: each equals the method's own function on the group)
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_group(
    model,
    tokenizer,
    examples: list[dict],
    task: str,
    G: int,
    max_len: int,
    seed: int,
    prompts_per_try: int = 8,
    tries: int = 20,
) -> Optional[dict]:
    """G completions of one training prompt whose rewards differ, or None after `tries` batches.

    Prompts come in a seeded order, prompts_per_try at a time; rewards are common.finished_rewards
    (a completion without EOS scores 0, as in SPO). Returns the group's tensors on the CPU, and
    under "batch" the whole try it was picked from (the round cDPO's models are fitted on).
    """
    device = next(model.parameters()).device
    common.seed_everything(seed)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = tokenizer.eos_token_id
    for t in range(tries):
        idx = order[t * prompts_per_try : (t + 1) * prompts_per_try]
        if not idx:
            break
        rows = common.tokenize_prompts(tokenizer, [examples[i] for i in idx], task, None, max_len)
        p_ids, p_mask = common.left_pad(rows, tokenizer.pad_token_id, device)
        c_ids = common.generate(model, tokenizer, p_ids, p_mask, max_len, G).cpu()
        texts = common.decode_completions(tokenizer, c_ids)
        rewards = common.finished_rewards(
            texts, [examples[i]["answer"] for i in idx for _ in range(G)], c_ids, eos
        )
        g = common.pick_credit_group(rewards, G)
        if g is None:
            continue
        rs = slice(g * G, (g + 1) * G)
        ids = c_ids[rs]
        mask = common.completion_mask_from_ids(ids, eos)
        L = int(mask.sum(1).max())  # drop the columns that are padding in every row
        return {
            "example": examples[idx[g]],
            "prompt_row": rows[g],
            "prompt_ids": p_ids[g : g + 1].cpu().repeat(G, 1),
            "prompt_mask": p_mask[g : g + 1].cpu().repeat(G, 1),
            "completion_ids": ids[:, :L],
            "completion_mask": mask[:, :L],
            "rewards": rewards[rs],
            "texts": texts[rs.start : rs.stop],
            "batch": {"examples": [examples[i] for i in idx], "prompt_rows": rows,
                      "completion_ids": c_ids, "texts": texts, "rewards": rewards},
        }
    return None


@torch.no_grad()
def credit_matrices(
    group: dict,
    model,
    tokenizer,
    ref_model=None,
    guidance_model=None,
    *,
    max_len: int,
    rho: float = 0.9,
    cutpoint_interval: int = 5,
    partition: str = "even",
    num_rollouts: int = spo.TINY_NUM_ROLLOUTS,
    mc_seed: int = 0,
    beta: float = 0.1,
    cdpo_models: Optional[tuple] = None,
    cdpo_lam: float = 1.0,
    tw_alpha: float = 1.7,
    d3s_n: Optional[int] = None,
    d3s_k: float = 0.2,
) -> tuple[dict, list[str]]:
    """{panel name: [G, L] tensor} for one group, and notes on the panels left out.

    Each matrix is 0 where completion_mask is 0. Sequence-level advantages (GRPO, DCPO) are
    repeated on every token of their completion. ref_model None: no TDPO/TGDPO panels.
    d3s_n (default G // 2) and d3s_k: D3S's rollouts kept and token share (its first step).
    """
    ids, mask, r = group["completion_ids"], group["completion_mask"], group["rewards"]
    G = ids.size(0)
    m = mask > 0
    out, notes = {}, []
    out["GRPO"] = torch.where(m, grpo.compute_advantages(r, G)[:, None], 0.0)
    out["TEMPO"] = tempo.compute_tempo_advantages(r, G, ids, mask)[0].float()
    # SPO-chain, as spo.py computes it (one no-grad forward for pi_old, then the MC values)
    device = next(model.parameters()).device
    p_ids, p_mask = group["prompt_ids"].to(device), group["prompt_mask"].to(device)
    old, _ = common.per_token_logps(model, p_ids, p_mask, ids.to(device), mask.to(device), 1.0)
    prob_mask = spo.probability_mask(old.cpu(), mask, rho)
    starts = spo.segment_starts(prob_mask > 0, cutpoint_interval, partition)
    prefixes, index = spo.plan_mc_prefixes(ids, starts, torch.zeros(G, dtype=torch.long))
    mc, _ = spo.mc_rollout_rewards(
        model,
        tokenizer,
        prefixes,
        [group["prompt_row"]],
        [group["example"]["answer"]],
        num_rollouts,
        max_len,
        seed=mc_seed,
    )
    _, spo_adv = spo.chain_advantages(spo.mc_values(mc, index), r, starts, mask)
    out["SPO-chain"] = (spo_adv * prob_mask).float()
    sas, _, _ = dcpo.sas_advantages(r, G, [group["example"]["id"]], dcpo.PromptStats(G))
    out["DCPO"] = torch.where(m, sas[:, None], 0.0)
    # TW-GRPO: the policy is pi_old here (no update runs), T = 1 as the runs' default
    h = common.response_hidden_states(model, p_ids, p_mask, ids.to(device), mask.to(device))
    tw, _ = grpo.tw_token_weights(h, mask.to(device), G, tw_alpha, 1.0, "uniform",
                                  model.get_output_embeddings())
    out["TW-GRPO: w_t"] = tw.float().cpu()
    # D3S: one group, so cross and intra select the same rollouts
    _, ent = common.per_token_logps(model, p_ids, p_mask, ids.to(device), mask.to(device), 1.0,
                                    with_entropy=True)
    adv = grpo.compute_advantages(r, G)
    kept = grpo.d3s_select(adv, G, d3s_n or max(1, G // 2), "cross")
    e, _ = grpo.d3s_token_mask(adv, ent.cpu(), mask.float(), kept, d3s_k)
    out["D3S: kept tokens' A"] = (adv[:, None] * e).float()
    if ref_model is not None:
        h = common.response_hidden_states(model, p_ids, p_mask, ids.to(device), mask.to(device))
        h_ref = common.response_hidden_states(
            ref_model, p_ids, p_mask, ids.to(device), mask.to(device)
        )
        _, ref_logps, kl = token_dpo.token_logps_and_kl(
            h,
            h_ref,
            ids.to(device),
            mask.to(device),
            model.get_output_embeddings(),
            ref_model.get_output_embeddings(),
        )
        if kl.abs().max() > 0:
            out["TDPO: per-token KL"] = kl.cpu()
        else:
            notes.append("TDPO: its per-token KL is 0 on every token (the policy is the "
                         "reference); pass --run RUN_DIR of a trained run, e.g. token_dpo.py "
                         "--loss tdpo2")
        if guidance_model is not None:
            g_logps, _ = common.per_token_logps(
                guidance_model, p_ids, p_mask, ids.to(device), mask.to(device), 1.0
            )
            rhat = beta * torch.where(m, (g_logps - ref_logps).cpu(), 0.0)
            if rhat.abs().max() > 0:
                out["TGDPO: guidance r_hat"] = rhat
            else:
                notes.append(
                    "TGDPO: r_hat is 0 on every token (the guidance model is the reference)"
                )
        else:
            notes.append(
                "TGDPO: no guidance model (its guidance is the policy after a first DPO round): "
                "pass --run RUN_DIR of a token_dpo.py --loss tgdpo run, or --guidance-model DIR"
            )
    cdpo_weights = getattr(token_dpo, "cdpo_weights", None)
    if cdpo_weights is None:
        notes.append("cDPO: token_dpo.py has no cdpo_weights; panel skipped")
    elif cdpo_models is None:
        notes.append(
            "cDPO: pass --cdpo-models POS NEG (its positive and negative models) to draw w_t"
        )
    else:
        pos, neg = cdpo_models
        hp = common.response_hidden_states(pos, p_ids, p_mask, ids.to(device), mask.to(device))
        hn = common.response_hidden_states(neg, p_ids, p_mask, ids.to(device), mask.to(device))
        out["cDPO: w_t"] = cdpo_weights(
            hp,
            hn,
            ids.to(device),
            mask.to(device),
            cdpo_lam,
            pos.get_output_embeddings(),
            neg.get_output_embeddings(),
        ).cpu()
    return out, notes


def truth_panel(group: dict, model, tokenizer, K: int, max_len: int, seed: int) -> torch.Tensor:
    """The Monte Carlo true advantage A* [G, L] of the group (credit_truth.py's functions)."""
    import credit_truth  # here, not at the top: credit_truth imports this file

    mc, index, _ = credit_truth.mc_truth(model, tokenizer, group, K, max_len, seed)
    return credit_truth.true_advantages(mc, index, group["rewards"],
                                        group["completion_mask"])["adv"].float()


def fit_cdpo_models(group: dict, ref_model, tokenizer, steps: int, seed: int = 0,
                    round_no: int = 1) -> tuple[tuple, str]:
    """cDPO's positive and negative models, fitted as token_dpo.py fits them in round round_no.

    The round's samples are group["batch"] (the prompts x G completions the group was picked
    from); token_dpo.cdpo_sets picks the rows, and each model is token_dpo.train_ce_model on a
    fresh copy of ref_model, with token_dpo.py's defaults (rows per step, learning rate) and the
    generators seeded as token_dpo.add_cdpo_weights seeds them. Returns ((pos, neg), a note).
    """
    b, G = group["batch"], group["completion_ids"].size(0)
    defaults = {f.name: f.default for f in dataclasses.fields(token_dpo.Args)}
    args = SimpleNamespace(seed=seed, task="arith")
    n = len(b["examples"])
    (pos_rows, neg_rows), _, flags = token_dpo.cdpo_sets(
        b["texts"], b["rewards"], b["completion_ids"], tokenizer, list(range(n)), b["examples"],
        b["prompt_rows"], G, [], args, round_no)
    base = seed * 100003 + round_no
    models = []
    for k, rows in ((1, pos_rows), (2, neg_rows)):
        gen = torch.Generator().manual_seed(base + k * 1_000_000_007)
        models.append(token_dpo.train_ce_model(ref_model, tokenizer, rows, steps,
                                               defaults["ce_sft_rows"], defaults["ce_sft_lr"],
                                               gen)[0])
    fallback = " (every wrong row: none finished with an answer)" if flags[
        "cdpo/neg_fallback"] else ""
    note = (f"cDPO: its positive and negative models fitted here from the reference, as "
            f"token_dpo.py's round {round_no} does: {steps} steps of {defaults['ce_sft_rows']} "
            f"rows on {len(pos_rows)} right and {len(neg_rows)}{fallback} wrong answers of "
            f"the {n} prompts sampled")
    return (models[0], models[1]), note


def token_texts(tokenizer, group: dict) -> list[list[str]]:
    """The text of each token of each completion ('$' for EOS, '\\n' for a newline)."""
    eos = tokenizer.eos_token_id
    n = group["completion_mask"].sum(1).long().tolist()
    return [
        [EOS_TEXT if t == eos else tokenizer.decode([t]).replace("\n", "\\n") for t in row[:k]]
        for row, k in zip(group["completion_ids"].tolist(), n)
    ]


# ----------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------


def draw(
    path: Path, matrices: dict, tokens: list[list[str]], group: dict, notes: list[str], title: str
) -> bool:
    """The PNG: one panel per method, one row per completion, one cell per token. False without
    matplotlib (and one line saying so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import Normalize, TwoSlopeNorm
    except ImportError:
        print(
            "note: matplotlib is not installed, so no PNG "
            "(pip install -r benchmarks/requirements-plots.txt); "
            "the matrices are in the .json",
            file=sys.stderr,
        )
        return False
    names = list(matrices)
    G, L = group["completion_mask"].shape
    cols = 2 if L > 30 else 4  # long completions: two panels a row, so cells stay legible
    rows_n = -(-len(names) // cols)
    cell_w, cell_h = 0.17, 0.32
    fig_w = cols * (L * cell_w + 1.6)
    fig_h = rows_n * (G * cell_h + 0.8) + 0.6 + 0.2 * len(notes)
    fig, axes = plt.subplots(rows_n, cols, figsize=(fig_w, fig_h), squeeze=False)
    r = group["rewards"].tolist()
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        name, mat = names[k], matrices[names[k]].double()
        mask = group["completion_mask"] > 0
        vals = mat[mask]
        if name.startswith("TW-GRPO"):  # weights in [1, alpha]: 1 is "no emphasis"
            norm, cmap = Normalize(1.0, max(float(vals.max()), 1.0 + 1e-12)), "Purples"
        elif "KL" in name or "w_t" in name:  # non-negative quantities: a sequential scale
            norm, cmap = Normalize(0.0, max(float(vals.max()), 1e-12)), "Purples"
        else:
            lim = max(float(vals.abs().max()), 1e-12)
            norm, cmap = TwoSlopeNorm(0.0, -lim, lim), "RdBu"
        shown = mat.masked_fill(~mask, float("nan")).numpy()
        img = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i, toks in enumerate(tokens):
            for t, s in enumerate(toks):
                shade = norm(float(mat[i, t]))
                dark = abs(shade - 0.5) > 0.35 if cmap == "RdBu" else shade > 0.65
                ax.text(
                    t,
                    i,
                    s,
                    ha="center",
                    va="center",
                    fontsize=7,
                    family="monospace",
                    color="white" if dark else "black",
                )
        ax.set_yticks(range(G), [f"o{i + 1} r={r[i]:.0f}" for i in range(G)], fontsize=7)
        ax.set_xticks([])
        ax.set_title(name, fontsize=10)
        fig.colorbar(img, ax=ax, fraction=0.025, pad=0.01).ax.tick_params(labelsize=7)
    ex = group["example"]
    fig.suptitle(
        f"{title}\nprompt {ex['question']!r} (gold {ex['answer']}); colour = what the method gives "
        f"each token; {EOS_TEXT} = EOS; white = no token",
        fontsize=10,
    )
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, (0.2 * len(notes) + 0.1) / fig_h, 1, 1 - 0.55 / fig_h))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=Formatter, epilog=EPILOG
    )
    p.add_argument(
        "--run",
        default=None,
        help="a run folder: use its last checkpoint (default: the warm start)",
    )
    p.add_argument("--arith-ops", default=None, help="length setting; default: the run's, else 2-4")
    p.add_argument("--num-generations", type=int, default=8, help="G, completions in the group")
    p.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed")
    p.add_argument(
        "--guidance-model",
        default=None,
        help="TGDPO's guidance model (default: RUN/guidance if any)",
    )
    p.add_argument(
        "--cdpo-models",
        nargs=2,
        default=None,
        metavar=("POS", "NEG"),
        help="cDPO's positive and negative model folders; without them both are fitted here "
        "(--cdpo-sft-steps)",
    )
    p.add_argument(
        "--cdpo-sft-steps",
        type=int,
        default=token_dpo.Args.ce_sft_steps,
        help="without --cdpo-models: fit cDPO's two models for this many steps, as token_dpo.py's "
        "first round does (its --ce-sft-steps; about 30 s on one CPU thread); 0: no cDPO panel",
    )
    p.add_argument(
        "--truth-k",
        type=int,
        default=64,
        help="K continuations per prefix for the Monte Carlo truth panel (0: no panel)",
    )
    p.add_argument(
        "--out",
        default="runs/credit_map/credit_map.png",
        help="the PNG (needs matplotlib); the matrices go beside it as .json",
    )
    a = p.parse_args(argv)
    try:
        _main(a)
    except common.UserError as e:
        common.fail(str(e))


def load_setting(run: Optional[str], arith_ops: Optional[str], guidance_model=None,
                 cdpo_dirs=None) -> dict:
    """The models a credit picture needs, loaded as credit_map.py and credit_truth.py share them.

    run None: the warm start of arith_ops (default 2-4) is both the policy and the reference.
    A run folder: its last checkpoint is the policy, its setting's warm start the reference,
    its guidance folder (if any) TGDPO's guidance model. Returns a dict with model, ref,
    tokenizer, guidance, cdpo_models, ops, max_len and the run's config.
    """
    config = {}
    if run:
        ckpt = common.latest_checkpoint(Path(run))
        if ckpt is None:
            raise common.UserError(
                f"{run} has no complete checkpoint yet; pass a finished run folder"
            )
        config = json.loads((Path(run) / "config.json").read_text())
        if config.get("model", "tiny") != common.TINY or config.get("task", "arith") != "arith":
            raise common.UserError(
                "the credit benchmarks read runs of the tiny model on the arith task; "
                f"{run} has model {config.get('model')!r}, task {config.get('task')!r}"
            )
    ops = arith_ops or config.get("arith_ops", "2-4")
    device, dtype = torch.device("cpu"), torch.float32
    ref, tokenizer = common.load_model_and_tokenizer(common.TINY, device, dtype, ops)
    model = common.load_model_and_tokenizer(str(ckpt), device, dtype)[0] if run else ref
    guidance_dir = guidance_model or (
        config.get("guidance_model")
        or (str(Path(run) / "guidance") if run and (Path(run) / "guidance").exists() else None)
    )
    guidance = (
        common.load_model_and_tokenizer(guidance_dir, device, dtype)[0] if guidance_dir else None
    )
    cdpo_models = (
        tuple(common.load_model_and_tokenizer(d, device, dtype)[0] for d in cdpo_dirs)
        if cdpo_dirs
        else None
    )
    max_len = config.get("max_completion_length") or common.default_max_len("arith", ops)
    return dict(model=model, ref=ref, tokenizer=tokenizer, guidance=guidance,
                cdpo_models=cdpo_models, ops=ops, max_len=max_len, config=config)


def _main(a) -> None:
    if a.num_generations < 2:
        raise common.UserError(
            f"--num-generations must be at least 2 (got {a.num_generations}): "
            "a group of one has no spread; pass e.g. --num-generations 8"
        )
    if a.cdpo_sft_steps < 0:
        raise common.UserError(f"--cdpo-sft-steps must be at least 0 (got {a.cdpo_sft_steps}); "
                               "0 leaves the cDPO panel out")
    s = load_setting(a.run, a.arith_ops, a.guidance_model, a.cdpo_models)
    model, ref, tokenizer, ops, max_len = s["model"], s["ref"], s["tokenizer"], s["ops"], \
        s["max_len"]
    train = common.load_task("arith", "train", None, ops)
    group = sample_group(model, tokenizer, train, "arith", a.num_generations, max_len, a.seed)
    if group is None:
        raise common.UserError(
            "no group with differing rewards in 160 prompts (every answer right, or every "
            "one wrong); try another --seed or a less or more trained --run"
        )
    cdpo_models, fitted = s["cdpo_models"], []
    if cdpo_models is None and a.cdpo_sft_steps > 0:
        cdpo_models, note = fit_cdpo_models(group, ref, tokenizer, a.cdpo_sft_steps, a.seed)
        fitted.append(note)
    matrices, notes = credit_matrices(
        group,
        model,
        tokenizer,
        ref,
        s["guidance"],
        max_len=max_len,
        mc_seed=a.seed,
        cdpo_models=cdpo_models,
    )
    notes = fitted + notes
    if a.truth_k > 0:  # the truth first, the methods beside it
        truth = truth_panel(group, model, tokenizer, a.truth_k, max_len, a.seed)
        matrices = {f"MC truth: A* (K={a.truth_k})": truth, **matrices}
    tokens = token_texts(tokenizer, group)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dump = {
        "arith_ops": ops,
        "run": a.run,
        "example": group["example"],
        "rewards": group["rewards"].tolist(),
        "tokens": tokens,
        "notes": notes,
        "matrices": {
            k: [[round(float(v), 6) for v in row[: len(t)]] for row, t in zip(m, tokens)]
            for k, m in matrices.items()
        },
    }
    out.with_suffix(".json").write_text(json.dumps(dump, indent=1))
    source = f"run {a.run}" if a.run else f"the tiny model's warm start (--arith-ops {ops})"
    drawn = draw(out, matrices, tokens, group, notes, f"credit map: {source}")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out.with_suffix('.json')}" + (f" and {out}" if drawn else ""))


if __name__ == "__main__":
    main()
