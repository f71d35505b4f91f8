"""Every kind of bad input, against every script: exit 2, one line naming the flag, no run left.

One table (CASES) of bad inputs, grouped by kind. For each script, the first case of each kind
runs as a subprocess, exactly as a user types it; the other cases of the kind run the same
`common.run_main` in this process (no second import of torch). Every check happens before the
model loads and before the run folder exists, so a case costs the import and nothing else.
A refused --resume must leave every file of the run as it was.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT, batch_flag, field_name, flag_name

SCRIPTS = [s for s in ("grpo", "tempo", "dcpo", "spo", "token_dpo") if (ROOT / f"{s}.py").exists()]
MODULES = {s: __import__(s) for s in SCRIPTS}
sys.path.insert(0, str(ROOT / "integrations"))
import train_trl  # noqa: E402  (imports TRL only when it builds a trainer)

MODULES["train_trl"] = train_trl  # its Args join the field checks below


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, random_tiny_model_dir):
    """The files the bad inputs point at: built once for the whole table."""
    root = tmp_path_factory.mktemp("bad_input")
    c = {"root": root, "model": str(random_tiny_model_dir)}
    c["file"] = root / "a_file"
    c["file"].write_text("not a folder")
    c["ro"] = read_only_dir(root)
    trunc = root / "truncated_model"
    shutil.copytree(random_tiny_model_dir, trunc)
    weights = trunc / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    c["truncated"] = trunc
    trunc_bin = root / "truncated_bin_model"  # the older format: pytorch_model.bin, a zip
    shutil.copytree(random_tiny_model_dir, trunc_bin,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.torch import load_file
    bin_file = trunc_bin / "pytorch_model.bin"
    torch.save(load_file(Path(random_tiny_model_dir) / "model.safetensors"), bin_file)
    os.truncate(bin_file, bin_file.stat().st_size // 2)
    c["truncated_bin"] = trunc_bin
    good = json.dumps({"question": "1+1", "answer": "1+1=2 #### 2"})
    bad_lines = {"utf8": b'{"question": "1+1\xff", "answer": "#### 2"}', "broken": b"{not json",
                 "gold": json.dumps({"question": "3/4?", "answer": "so #### 3/4"}).encode()}
    for name, bad in bad_lines.items():
        (root / name).mkdir()
        (root / name / "train.jsonl").write_bytes(good.encode() + b"\n" + bad + b"\n")
        (root / name / "test.jsonl").write_text(good + "\n")
    c["pairs_utf8"] = root / "pairs.jsonl"
    c["pairs_utf8"].write_bytes(b'{"prompt": "1+1", "chosen": "2", "rejected": "3\xc3"}\n')
    (root / "not_a_run").mkdir()
    for s in SCRIPTS:  # a run folder of each script, as its config.json says (no checkpoint needed)
        run = root / "runs" / f"{s}__tiny__arith__0__1"
        (run / "checkpoints" / "step-0000001").mkdir(parents=True)
        batch = {field_name(s, "prompts_per_step"): 2}
        cfg = dict(algo=s, **dataclasses.asdict(MODULES[s].Args(**batch)))
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "metrics.jsonl").write_text('{"step": 0}\n')
        (run / "checkpoints" / "step-0000001" / "COMPLETE").write_text("1")
        c[f"run_{s}"] = run
    return c


def read_only_dir(root: Path) -> typing.Optional[str]:
    """A folder this user cannot write in: chmod 555, or for root (who writes anyway) /sys."""
    ro = root / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    for cand in (ro, Path("/sys")):
        try:
            (cand / "probe").mkdir()
            (cand / "probe").rmdir()
        except OSError:
            return str(cand / "runs")
    return None


def other(script):
    return SCRIPTS[(SCRIPTS.index(script) + 1) % len(SCRIPTS)]


def A(*argv):
    return lambda c, s: list(argv)


def gsm8k(folder):
    return lambda c, s: ["--task", "gsm8k", "--data-dir", str(c["root"] / folder)]


# (kind, argv builder, words in the one line[, the flag it must name: default, the first of argv])
CASES = [
    ("argparse", A("--dtype", "fp8"), "invalid choice: 'fp8'"),
    ("range", A("--dtype", "float16"), "needs loss scaling"),
    ("argparse", A("--total-steps", "two"), "invalid int value: 'two'"),
    ("argparse", A("--learning-rate", "fast"), "invalid float value"),
    ("argparse", A("--no-such-flag", "1"), "unrecognized arguments"),
    ("argparse", A("--totalsteps", "1"),
     "unrecognized arguments: --totalsteps 1 (did you mean --total-steps?)"),
    ("range", lambda c, s: [flag_name(s, "temperature"), "0"], "must be positive, got 0.0"),
    ("range", A("--seed", "-1"), "is outside [0, 4294967295], got -1"),
    ("range", A("--seed", str(2**32)), "is outside"),
    ("range", A("--eval-every", "0"), "must be positive"),
    ("range", A("--save-every", "0"), "must be positive"),
    ("range", A("--log-completions-every", "0"), "must be positive"),
    ("range", A("--max-completion-length", "-4"), "must be positive"),
    ("range", A("--max-completion-length", "0"), "must be positive"),
    ("range", A("--learning-rate", "0"), "must be positive, got 0.0"),
    ("range", A("--learning-rate", "-1"), "must be positive"),
    ("range", A("--learning-rate", "nan"), "must be a finite number"),
    ("range", A("--max-grad-norm", "inf"), "must be a finite number"),
    ("range", A("--top-p", "1.5"), "is outside (0, 1]"),
    ("range", A("--eval-size", "0"), "must be positive"),
    ("range", A("--num-generations", "0"), "must be at least"),
    ("range", A("--arith-ops", "8-6"), "is not a range of operations LO-HI"),
    ("range", A("--arith-ops", "1-3"), "is not a range of operations LO-HI"),
    ("device", A("--device", "gpu0"), "is not a device"),
    ("device", A("--device", "cuda"), "no CUDA GPU is visible"),
    ("device", A("--device", "cuda:0"), "no CUDA GPU is visible"),
    ("output", lambda c, s: ["--output-dir", str(c["file"])], "is a file, not a folder"),
    ("output", lambda c, s: ["--output-dir", str(c["file"] / "runs")], "is a file, not a folder"),
    ("output", lambda c, s: ["--output-dir", c["ro"]], "cannot write in"),
    ("model", lambda c, s: ["--model", str(c["truncated"])], "model.safetensors is truncated"),
    ("model", A("--model", "./no/such/model"), "does not exist"),
    ("model", lambda c, s: ["--model", str(c["truncated_bin"])], "pytorch_model.bin is truncated"),
    ("data", gsm8k("utf8"), "train.jsonl:2 is not valid UTF-8 (byte 0xff at column 18)",
     "--data-dir"),
    ("data", gsm8k("gold"), "train.jsonl:2: the gold answer after '####' is '3/4', not a number",
     "--data-dir"),
    ("data", gsm8k("missing"), "not found", "--data-dir"),
    ("data", gsm8k("broken"), "train.jsonl:2 is not a GSM8K record", "--data-dir"),
    ("data", A("--task", "gsm8k", "--data-dir", "hub"), "needs the `datasets` package",
     "--data-dir"),
    # the embedded tiny model with gsm8k: refused before any load (issue 26, item 2a); the folder
    # exists, so the data is not what is refused
    ("tiny", lambda c, s: ["--model", "tiny", *gsm8k("utf8")(c, s)], "is for --task arith",
     "--model"),
    ("resume", lambda c, s: ["--resume", str(c[f"run_{s}"]), batch_flag(s), "3"],
     " 3 differs from the run's 2", batch_flag),
    ("resume", lambda c, s: ["--resume", str(c[f"run_{s}"]), "--seed", "1", "--total-steps", "9"],
     "--seed 1 differs from the run's 0", "--seed"),
    ("resume", lambda c, s: ["--resume", str(c[f"run_{other(s)}"])], "is a run of"),
    ("resume", lambda c, s: ["--resume", str(c["root"] / "not_a_run")], "is not a run folder"),
    ("pairs", lambda c, s: ["--pairs-file", str(c["pairs_utf8"])],
     "pairs.jsonl:1 is not valid UTF-8 (byte 0xc3 at column 48)"),
    ("pairs", lambda c, s: ["--pairs-file", str(c["root"] / "no_pairs.jsonl")], "does not exist"),
    ("tw", A("--tw-alpha", "0.5"), "must be at least 1, got 0.5"),
    ("tw", A("--token-weighting", "all"), "invalid choice: 'all'"),
    ("tw", A("--tw-ended", "zero"), "invalid choice: 'zero'"),
    ("d3s", A("--d3s", "cross", "--top-entropy-quantile", "0.2"), "two token masks"),
    ("d3s", A("--d3s", "both"), "invalid choice: 'both'"),
    ("d3s", A("--d3s", "intra", "--d3s-n-init", "9"), "must be at most --num-generations (8)",
     "--d3s-n-init"),
    ("d3s", A("--d3s-n-final", "0"), "must be positive"),
    ("d3s", A("--d3s-k-init", "0"), "is outside (0, 1]"),
    ("d3s", A("--d3s-k-final", "1.5"), "is outside (0, 1]"),
    ("tabpo", A("--tabpo-tau", "-0.1"), "must be at least 0"),
    ("tabpo", A("--tabpo-barrier-weight", "-1"), "must be at least 0"),
    ("tabpo", A("--tabpo-diff-weight", "0"), "must be positive"),
    ("tabpo", A("--loss", "tab"), "invalid choice: 'tab'"),
    ("tabpo", A("--beta", "0"), "must be positive"),
]
# kinds that only some scripts have
ONLY = {"pairs": ["token_dpo"], "tw": ["grpo"], "d3s": ["grpo"], "tabpo": ["token_dpo"]}
FIRST_OF_KIND = {case[0]: i for i, case in reversed(list(enumerate(CASES)))}


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()


def table():
    for script in SCRIPTS:
        for i, (kind, *_) in enumerate(CASES):
            if kind in ONLY and script not in ONLY[kind]:
                continue
            how = "subprocess" if FIRST_OF_KIND[kind] == i else "in-process"
            yield pytest.param(script, i, how, id=f"{script}-{kind}-{i}-{how}")


@pytest.mark.parametrize("script,i,how", list(table()))
def test_bad_input(script, i, how, ctx, tmp_path, capsys, monkeypatch):
    kind, make_argv, words, *flag = CASES[i]
    if kind == "device" and "cuda" in words and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if kind == "output" and words == "cannot write in" and ctx["ro"] is None:
        pytest.skip("no folder here is read-only for this user")
    out = tmp_path / "out"
    argv = make_argv(ctx, script)
    flag = flag[0] if flag else argv[0]
    flag = flag(script) if callable(flag) else flag  # a flag whose name depends on the script
    if kind != "resume":  # (a resume takes the run's own --model and --output-dir)
        argv = ["--model", ctx["model"], "--output-dir", str(out), "--total-steps", "1", *argv]
    runs = {s: tree_hash(ctx[f"run_{s}"]) for s in SCRIPTS}
    if how == "subprocess":
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *argv],
                             capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        code, err = res.returncode, res.stderr
    else:
        monkeypatch.setitem(sys.modules, "datasets", None)  # --data-dir hub: never the network
        with pytest.raises(SystemExit) as e:
            common.run_main(MODULES[script].main, MODULES[script].Args, argv)
        code, err = e.value.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    line = lines[0]
    assert line.startswith("error: ") and words in line and flag in line, line
    if kind == "argparse":
        assert line.endswith(f"see {script}.py --help"), line
    assert not out.exists(), "a run folder was left behind"
    after = {s: tree_hash(ctx[f"run_{s}"]) for s in SCRIPTS}
    assert after == runs, "a refused --resume changed the run"


# ---------------------------------------------------------------- every field of every script


def bad_values(rng: str, is_int: bool) -> list:
    """Values just outside a numeric range, and non-finite ones for floats."""
    m = common._INTERVAL.fullmatch(rng)
    if m:
        lo, hi = common._bound(m[2]), common._bound(m[3])
        out = [lo - 1 if m[1] == "[" else lo, hi + 1 if m[4] == "]" else hi]
    else:
        m = common._BOUND.fullmatch(rng)
        b = common._bound(m[2])
        out = [{">": b, ">=": b - 1, "<": b, "<=": b + 1}[m[1]]]
    out = [int(v) for v in out] if is_int else out + [float("nan"), float("inf")]
    return out


def numeric_fields(args_cls):
    hints = typing.get_type_hints(args_cls)
    for f in dataclasses.fields(args_cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if inner[0] in (int, float):
            yield f, inner[0] is int


@pytest.mark.parametrize("script", [*SCRIPTS, "train_trl"])
def test_every_field_has_a_range_and_out_of_range_values_are_refused(script):
    mod = MODULES[script]
    hints = typing.get_type_hints(mod.Args)
    for f in dataclasses.fields(mod.Args):
        tp = hints[f.name]
        is_choice = tp is bool or typing.get_origin(tp) is typing.Literal  # argparse checks these
        assert is_choice or f.metadata.get("range"), f"{script}.Args.{f.name} has no range"
    common.check_args(mod.Args(), script)  # the defaults are in range
    checked = 0
    for f, is_int in numeric_fields(mod.Args):
        flag = "--" + f.name.replace("_", "-")
        for value in bad_values(f.metadata["range"], is_int):
            with pytest.raises(common.UserError) as e:
                common.check_args(mod.Args(**{f.name: value}), script)
            assert str(e.value).startswith(flag) and str(value) in str(e.value), str(e.value)
            checked += 1
    assert checked >= 20


def test_shared_flags_mean_the_same_in_every_script():
    """A flag two scripts share has one range everywhere, except where the method differs (said below)."""
    differs = {("token_dpo", "beta"),  # DPO's beta, not a KL coefficient
               ("token_dpo", "num_generations")}  # 1 is fine with --pairs-file
    ranges = {}
    for script in [*SCRIPTS, "train_trl"]:
        for f in dataclasses.fields(MODULES[script].Args):
            if (script, f.name) not in differs and "range" in f.metadata:
                ranges.setdefault(f.name, set()).add(f.metadata["range"])
    assert {k: v for k, v in ranges.items() if len(v) > 1} == {}


def test_zero_is_honoured_or_refused_never_replaced():
    """`--max-bad-steps 0`, `--top-k 0` mean 0 (off); a 0 out of range is refused, not defaulted."""
    argv = ["--max-bad-steps", "0", "--top-k", "0", "--beta", "0"]
    args = common.parse_args(MODULES["grpo"].Args, argv)
    common.check_args(args, "grpo")
    assert (args.max_bad_steps, args.top_k, args.beta) == (0, 0, 0.0)
    assert args.given == {"max_bad_steps", "top_k", "beta"}
    for script in SCRIPTS:  # no `args.x or default` left in any main
        src = (ROOT / f"{script}.py").read_text()
        assert "args.learning_rate or" not in src and "args.max_completion_length or" not in src


def test_tiny_model_with_gsm8k_is_one_line_naming_a_model_to_pass(ctx, tmp_path, capsys):
    """`grpo.py --task gsm8k` leaves --model at tiny: one line that says to pass --model, where a
    user once got a context error that named only --max-completion-length (issue 26, item 2a)."""
    argv = ["--task", "gsm8k", "--total-steps", "1", "--data-dir", str(ctx["root"] / "utf8"),
            "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        common.run_main(MODULES["grpo"].main, MODULES["grpo"].Args, argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: --task gsm8k needs --model: the embedded tiny model (--model tiny, the default) is "
        "for --task arith (trained on arithmetic only, and GSM8K's prompts do not fit its "
        "context); pass --model for gsm8k, e.g. --model Qwen/Qwen2.5-0.5B-Instruct\n")
    assert not (tmp_path / "out").exists()


def test_help_shows_each_range():
    parser = common._parser(MODULES["grpo"].Args)
    text = " ".join(parser.format_help().split())  # argparse wraps the lines
    assert "(default: 20; >0)" in text and "(default: 1.0; (0, 1])" in text
    assert "(default: 0; [0, 4294967295])" in text and "SEED_MAX" not in text  # --seed


@pytest.mark.parametrize("script", [*SCRIPTS, "train_trl"])
def test_help_gives_each_flag_one_default(script, monkeypatch, tmp_path):
    """--data-dir shows one default, the folder it reads when not given (issue 26, item 2c)."""
    monkeypatch.chdir(tmp_path)  # the folder is shown relative to here, or absolute if shorter
    text = " ".join(common._parser(MODULES[script].Args).format_help().split())
    text = text.split(" options: ", 1)[1]  # the help lines, after the usage
    data_dir = text.split("--data-dir DATA_DIR", 1)[1].split(" --", 1)[0]
    assert data_dir.count("default") == 1, data_dir
    shown = data_dir.split("(default: ", 1)[1].split(")", 1)[0]
    assert (tmp_path / shown).resolve() == common.gsm8k_dir(None).resolve(), shown


def test_a_mistyped_flag_gets_the_nearest_flags(capsys):
    argv = ["--totalsteps", "3", "--evalevery=2", "--no-such-flag"]
    with pytest.raises(SystemExit) as e:
        common.parse_args(MODULES["grpo"].Args, argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: unrecognized arguments: --totalsteps 3 --evalevery=2 --no-such-flag (did you mean "
        "--total-steps for --totalsteps, --eval-every for --evalevery?); see grpo.py --help\n")


# ---------------------------------------------------------------- integrations/train_trl.py

TRL_CASES = [  # issue 23, item 9: each was a traceback or silently accepted
    (["--learning-rate", "-1"], "--learning-rate must be positive"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--eps-low", "-1"], "--eps-low must be positive"),
    (["--beta", "-0.5"], "--beta must be at least 0"),
    (["--td-coef", "nan"], "--td-coef must be a finite number"),
    (["--max-completion-length", "0"], "--max-completion-length must be positive"),
    (["--vllm-server-port", "0"], "--vllm-server-port is outside [1, 65535]"),
    (["--task", "gsm8k", "--data-dir", "/no/such/gsm8k"], "GSM8K folder /no/such/gsm8k not found"),
    (["--method", "dcpo", "--save-steps", "3", "--num-iterations", "2"],
     "--save-steps 3 must be a multiple of --num-iterations 2"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
]


@pytest.mark.parametrize("i", range(len(TRL_CASES)))
def test_train_trl_bad_input_is_one_line_before_trl_or_a_model_loads(i, ctx, tmp_path, capsys,
                                                                     monkeypatch):
    argv, words = TRL_CASES[i]
    argv = ["--output-dir", str(tmp_path / "out"), *argv]
    if i == 0:  # as a user types it
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, str(ROOT / "integrations" / "train_trl.py"), *argv],
                             capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        code, err = res.returncode, res.stderr
    else:
        monkeypatch.setitem(sys.modules, "trl", None)  # any import of TRL would fail loudly
        with pytest.raises(SystemExit) as e:
            common.run_main(train_trl.main, train_trl.Args, argv)
        code, err = e.value.code, capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [err.strip()], err[-2000:]
    assert err.startswith("error: ") and words in err, err


def test_train_trl_refuses_an_unwritable_output_dir(ctx, capsys, monkeypatch):
    if ctx["ro"] is None:
        pytest.skip("no folder here is read-only for this user")
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(SystemExit) as e:
        common.run_main(train_trl.main, train_trl.Args, ["--output-dir", ctx["ro"]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot write in" in err and len(err.strip().splitlines()) == 1
