"""The embedded tiny model ships with the repository (tiny/arith-2-4, tiny/arith-6-8).

`--model tiny` must load the shipped folders on any machine without building anything, their
files must match the hashes their warm_start.json records, and a missing or damaged folder must
be said in one line and rebuilt into the cache, never a traceback.
"""
import json
import shutil

import pytest
import torch

import common


@pytest.mark.parametrize("ops", common.TINY_SHIPPED)
def test_the_shipped_folders_match_their_recorded_hashes(ops):
    path = common.shipped_tiny_dir(ops)
    info = json.loads((path / "warm_start.json").read_text())
    assert common.shipped_tiny_problem(path) is None
    assert set(info["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert {p.name for p in path.iterdir()} == set(info["files"]) | {"warm_start.json"}
    # how it was built: the command that rebuilds it, the commit, the CPU, the result
    assert info["command"] == f"python tiny/build.py --arith-ops {ops[0]}-{ops[1]}"
    assert info["commit"] and info["cpu"] and info["arith_ops"] == f"{ops[0]}-{ops[1]}"
    lo, hi = common.TINY_TARGET_ACC
    assert lo <= info["heldout_accuracy"] <= hi and info["sft_matmuls"] == "fp32"
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 8e6  # ~7 MB of fp32 weights, kept small on purpose


@pytest.mark.parametrize("ops", common.TINY_SHIPPED)
def test_model_tiny_loads_the_shipped_folder_and_builds_nothing(ops, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENCREDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(common, "build_tiny_model_folder", lambda *a, **k: pytest.fail("built"))
    model, tok = common.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32,
                                                 f"{ops[0]}-{ops[1]}")
    assert next(model.parameters()).dtype == torch.float32 and tok.padding_side == "left"
    assert not any(tmp_path.iterdir())  # nothing was cached


def _copy_shipped(tmp_path, monkeypatch):
    shipped = tmp_path / "tiny"
    shutil.copytree(common.TINY_DIR, shipped, ignore=shutil.ignore_patterns("*.py"))
    monkeypatch.setattr(common, "TINY_DIR", shipped)
    monkeypatch.setenv("TOKENCREDIT_CACHE", str(tmp_path / "cache"))
    built = []
    monkeypatch.setattr(common, "build_tiny_model_folder",
                        lambda path, **k: built.append((path, k)) or {})
    return shipped / "arith-2-4", built


@pytest.mark.parametrize("damage", ["delete_weights", "flip_a_byte", "delete_folder",
                                    "bad_json"])
def test_a_damaged_shipped_folder_is_one_line_and_rebuilt_into_the_cache(
        damage, tmp_path, monkeypatch, capsys):
    folder, built = _copy_shipped(tmp_path, monkeypatch)
    weights = folder / "model.safetensors"
    if damage == "delete_weights":
        weights.unlink()
    elif damage == "flip_a_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "delete_folder":
        shutil.rmtree(folder)
    else:
        (folder / "warm_start.json").write_text("{not json")
    path = common.ensure_tiny_model(seed=0, ops=(2, 4))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and "git checkout -- tiny" in err[0], err
    assert path == tmp_path / "cache" / "tiny-arith-2-4-v4-seed0"
    assert [b[0] for b in built] == [path] and built[0][1]["ops"] == (2, 4)


def test_other_settings_and_seeds_are_warm_started_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENCREDIT_CACHE", str(tmp_path))
    built = []
    monkeypatch.setattr(common, "build_tiny_model_folder",
                        lambda path, **k: built.append(path) or {})
    assert common.ensure_tiny_model(seed=0, ops=(3, 5)) == tmp_path / "tiny-arith-3-5-v4-seed0"
    assert common.ensure_tiny_model(seed=1) == tmp_path / "tiny-arith-2-4-v4-seed1"
    assert built == [tmp_path / "tiny-arith-3-5-v4-seed0", tmp_path / "tiny-arith-2-4-v4-seed1"]
    (tmp_path / "tiny-arith-3-5-v4-seed0").mkdir()
    (tmp_path / "tiny-arith-3-5-v4-seed0" / "warm_start.json").write_text("{}")
    assert common.ensure_tiny_model(seed=0, ops=(3, 5)) == tmp_path / "tiny-arith-3-5-v4-seed0"
    assert len(built) == 2  # cached: not built again


def test_the_warm_start_code_builds_a_folder_that_loads_and_verifies(tmp_path, monkeypatch):
    """The real build, cut short: a stop target of 0 ends it at its first evaluation."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(common, "TINY_STOP_ACC", 0.0)
    monkeypatch.setattr(common, "TINY_TARGET_ACC", (0.0, 1.0))
    info = common.build_tiny_model_folder(tmp_path / "m", seed=0, quiet=True, max_steps=3,
                                          eval_every=1, record={"command": "test"})
    assert info["sft_steps"] == 1 and info["command"] == "test"
    assert common.shipped_tiny_problem(tmp_path / "m") is None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.float32
    assert not list(tmp_path.glob("m.tmp*"))  # written atomically
    (tmp_path / "m" / "config.json").write_text("{}")
    assert "config.json does not match" in common.shipped_tiny_problem(tmp_path / "m")
