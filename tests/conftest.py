"""Shared fixtures. Everything here runs on a CPU in seconds, offline."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
torch.set_num_threads(min(2, torch.get_num_threads()))

import common  # noqa: E402


@pytest.fixture(scope="session")
def random_tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model + char tokenizer saved like any HF model (no warm start)."""
    path = tmp_path_factory.mktemp("random_tiny")
    torch.manual_seed(0)
    tok = common.build_char_tokenizer()
    model = common.build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def warm_tiny_model_dir() -> Path:
    """The embedded warm-started model (built once and cached, as `python grpo.py` does)."""
    return common.ensure_tiny_model(seed=0, quiet=True)
