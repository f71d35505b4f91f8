"""Decode tokens/s of common.generate against the memory-bandwidth bound of the device.

A decode step (one new token for every row of the batch) must read every weight once, so it
cannot take less than  weight_bytes / bandwidth  seconds. The bound on decode throughput is then

    tokens/s <= batch * bandwidth / weight_bytes          weight_bytes = parameters * bytes each

(the KV cache and activations add reads on top, so the true bound is lower still; at these
sizes the weights dominate). Example: Qwen2.5-0.5B in bf16 is 494.0M x 2 B = 0.988 GB; at the
H200's 4.8 TB/s a step takes at least 0.206 ms, so a batch of 128 decodes at most
128 / 0.206 ms = 622k tokens/s.

Measured: common.generate (one batched, KV-cached call, exactly L new tokens per row: EOS is
suppressed with min_new_tokens = L), timed for L tokens and for 1 token. The decode rate is
batch * (L - 1) / (t_L - t_1), so the prompt's prefill is not counted; the median of --repeats.

    python benchmarks/perf/bench_decode.py --quick                       # CPU smoke test
    python benchmarks/perf/bench_decode.py --device cuda --model qwen2.5-0.5b-random \\
        --dtype bfloat16 --prompts 16 --num-generations 8 --completion-length 256
                                                          # GPU (bandwidth from its name)

--bandwidth-gbs sets the bandwidth (GB/s, 1e9 bytes); without it, a few GPUs are known by name
(KNOWN_BANDWIDTH_GBS) and others get no bound. The report goes to --out (runs/bench_decode/).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
import common  # noqa: E402

KNOWN_BANDWIDTH_GBS = {  # the vendors' HBM figures, GB/s
    "H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0,
    "A10G": 600.0, "L4": 300.0, "T4": 320.0,
}


def decode_bound_tokens_per_s(num_params: int, bytes_per_param: int, batch: int,
                              bandwidth_gbs: float) -> float:
    """batch * bandwidth / weight_bytes: the most tokens/s a decode can reach (see the docstring).

    >>> round(decode_bound_tokens_per_s(494_032_768, 2, 128, 4800.0))
    621821
    """
    return batch * bandwidth_gbs * 1e9 / (num_params * bytes_per_param)


def known_bandwidth(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbs in KNOWN_BANDWIDTH_GBS.items():  # the most specific names come first
        if key in name:
            return gbs
    return None


def main(argv=None) -> dict:
    p = _bench.arg_parser(__doc__, "runs/bench_decode")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="the device's memory bandwidth in GB/s (default: known GPUs by name)")
    args = _bench.parse_args(argv, p)
    b = _bench.start(args, "Decode tokens/s against the memory-bandwidth bound")
    model, tokenizer = b.load(), b.tokenizer  # fp32 weights; decoding runs under autocast
    autocast = common.autocast(b.device, b.dtype)  # which reads its bf16 copies, cast once a call
    model.generation_config.min_new_tokens = b.L          # exactly L new tokens in every row
    rows = b.prompt_ids[: b.P]
    prompt_ids, prompt_mask = common.left_pad(rows, tokenizer.pad_token_id, b.device)
    batch = b.P * b.G

    def gen(n):
        model.generation_config.min_new_tokens = n
        with autocast():
            out = common.generate(model, tokenizer, prompt_ids, prompt_mask, n, b.G,
                                  args.temperature)
        assert out.shape == (batch, n), out.shape
    with torch.no_grad():
        t_full, t_one = [], []
        for i in range(args.warmup + args.repeats):
            s = _bench.now(b.device)
            gen(b.L)
            mid = _bench.now(b.device)
            gen(1)
            end = _bench.now(b.device)
            if i >= args.warmup:
                t_full.append(mid - s)
                t_one.append(end - mid)
    decode_s = [max(f - o, 1e-9) for f, o in zip(t_full, t_one)]
    rates = [batch * (b.L - 1) / d for d in decode_s]
    rate = _bench.med(rates)
    bytes_per_param = torch.finfo(b.dtype).bits // 8
    bw = args.bandwidth_gbs if args.bandwidth_gbs is not None else known_bandwidth(b.device)
    bound = None if bw is None else decode_bound_tokens_per_s(b.num_params, bytes_per_param,
                                                              batch, bw)
    weight_gb = b.num_params * bytes_per_param / 1e9
    b.report += [
        f"- batch {batch} rows, {b.L} new tokens each; weights {weight_gb:.3f} GB",
        f"- generate, {b.L} tokens: {_bench.fmt_t(t_full)}; 1 token (prefill): {_bench.fmt_t(t_one)}",
        f"- decode: {rate:,.0f} tokens/s (median; {min(rates):,.0f}-{max(rates):,.0f}), "
        f"{rate / batch:,.1f} steps/s",
        (f"- bound at {bw:,.0f} GB/s: {bound:,.0f} tokens/s; measured / bound = {rate / bound:.3f}"
         if bound else "- bound: no --bandwidth-gbs and no known bandwidth for this device"),
    ]
    result = dict(batch=batch, new_tokens=b.L, weight_gb=weight_gb, decode_tokens_per_s=rate,
                  bandwidth_gbs=bw, bound_tokens_per_s=bound, t_full=t_full, t_one=t_one)
    b.raw["decode"] = result
    _bench.write_report(b.report, b.raw, args.out)
    return result


if __name__ == "__main__":
    main()
