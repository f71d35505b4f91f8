"""The benchmarks' random models (benchmarks/perf/_bench.py): right shape, decodable, without
building 494M weights; and the GPU path of benchmarks/perf/bench_overhead.py on a CPU at a reduced
size."""
import json
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "perf"))
import _bench  # noqa: E402
import bench_overhead  # noqa: E402
import common  # noqa: E402


def test_qwen_shaped_random_model_has_qwen2_5_0_5b_parameter_count():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**_bench.QWEN_05B_SHAPE))
    # Qwen2.5-0.5B has 494,032,768 parameters (tied embeddings, 24 layers, 14 query / 2 KV heads)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_padded_char_tokenizer_encodes_like_the_char_tokenizer_and_decodes_any_id():
    tok = common.build_char_tokenizer(vocab_size=1000)
    char = common.build_char_tokenizer()
    text = common.format_prompt(char, "12+3-4", "arith")
    assert len(tok) == 1000
    assert tok(text)["input_ids"] == char(text)["input_ids"]
    assert (tok.pad_token_id, tok.eos_token_id) == (char.pad_token_id, char.eos_token_id)
    ids = char("7+8", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids + [999]) == "7+8<t999>"


def test_qwen_shaped_random_model_runs_the_overhead_part(monkeypatch, tmp_path):
    """The GPU path of the benchmark (`--model qwen2.5-0.5b-random`), end to end on a CPU, with the
    shape scaled down so that it takes seconds: build, save, load, generate, time, report."""
    small = dict(_bench.QWEN_05B_SHAPE, vocab_size=500, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setattr(_bench, "QWEN_05B_SHAPE", small)
    out = tmp_path / "bench"
    bench_overhead.main(["--model", "qwen2.5-0.5b-random", "--device", "cpu", "--betas", "0",
                         "--prompts", "1", "--num-generations", "2", "--completion-length", "4",
                         "--repeats", "1", "--warmup", "0", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert "Qwen2ForCausalLM" in report or "qwen" in report.lower()
    assert "per generated token" in report and "hand-written loop" in report
    raw = json.loads((out / "timings.json").read_text())
    assert raw["config"]["vocab"] == 500 and raw["overhead"]["beta=0.0"]["full"]
    assert set(raw["overhead"]["beta=0.0"]["decode_alternatives"]) == {"common.generate", "generate, static cache",
                                                                      "hand-written loop"}


def test_decode_bound_by_hand_and_the_decode_benchmark_runs(tmp_path):
    """bench_decode: the bound is batch * bandwidth / weight bytes, and the --quick path reports a
    measured rate and its share of the bound (a CPU, 1 thread; the GPU command is the same)."""
    import bench_decode

    # 494,032,768 bf16 weights = 0.988 GB; 4,800 GB/s / 0.988 GB = 4,858 steps/s; x 128 rows
    assert abs(bench_decode.decode_bound_tokens_per_s(494_032_768, 2, 128, 4800.0)
               - 128 * 4800e9 / (494_032_768 * 2)) < 1e-6
    assert round(bench_decode.decode_bound_tokens_per_s(494_032_768, 2, 128, 4800.0)) == 621_821
    assert bench_decode.known_bandwidth(torch.device("cpu")) is None
    out = bench_decode.main(["--quick", "--device", "cpu", "--bandwidth-gbs", "1000",
                             "--out", str(tmp_path)])
    assert out["batch"] == 4 and out["new_tokens"] == 8 and out["decode_tokens_per_s"] > 0
    assert out["bound_tokens_per_s"] == bench_decode.decode_bound_tokens_per_s(
        1_790_208, 4, 4, 1000.0)
    assert "measured / bound" in (tmp_path / "report.md").read_text()


def test_mc_benchmark_runs_and_both_paths_give_the_same_rewards(tmp_path):
    """bench_mc --quick: the shared-prefill Monte Carlo and the previous one-row-per-continuation
    path draw the same samples (the script exits non-zero if not) and the report is written."""
    import bench_mc

    report = bench_mc.main(["--quick", "--out", str(tmp_path)])
    assert report["same_rewards"] and report["rollouts"] == 8 * 4 and report["tokens"] > 0
    assert json.loads((tmp_path / "bench_mc_2-4.json").read_text())["speedup"] == report["speedup"]
