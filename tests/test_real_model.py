"""The same code path on a real pretrained model: SmolLM2-135M-Instruct from ../shared/models.

It has a 49k-token BPE tokenizer, a chat template, and pad == eos ("<|im_end|>"), the case that
breaks naive EOS masking. Skipped when ../shared or the converter's packages are absent.
"""
import importlib.util
import subprocess
import sys

import pytest
import torch

import common
from conftest import SHARED

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(
    not GGUF.exists() or importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs ../shared/models and `pip install -r tests/requirements.txt` (gguf, accelerate)")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, str(SHARED / "tools" / "smollm2_to_hf.py"), str(out), "--dtype", "float32"],
                   check=True, capture_output=True, timeout=600)
    return out


def test_real_model_masks_logps_and_prompts(smollm2_dir):
    model, tok = common.load_model_and_tokenizer(str(smollm2_dir), torch.device("cpu"), torch.float32)
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    prompt = common.format_prompt(tok, "What is 2+3?", "gsm8k")
    assert "<|im_start|>" in prompt and common.SYSTEM_PROMPT in prompt  # the chat template is used
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in (prompt, common.format_prompt(tok, "Hi?", "gsm8k"))]
    prompt_ids, prompt_mask = common.left_pad(rows, tok.pad_token_id, "cpu")
    torch.manual_seed(0)
    completion_ids = common.generate(model, tok, prompt_ids, prompt_mask, 12, 2, temperature=0.7)
    # pad == eos: mask is 1 up to and including the first EOS, whatever follows
    mask = common.completion_mask_from_ids(completion_ids, tok.eos_token_id)
    eos = tok.eos_token_id
    fake = torch.tensor([[11, 12, eos, eos, eos]])
    assert common.completion_mask_from_ids(fake, eos).tolist() == [[1, 1, 1, 0, 0]]
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(2, 0), prompt_mask.repeat_interleave(2, 0)
    with torch.no_grad():
        ours, _ = common.per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7)
        for i in range(completion_ids.size(0)):  # reference: unpadded row, full logits, log_softmax.gather
            p = prompt_ids[i][prompt_mask[i].bool()]
            ids = torch.cat([p, completion_ids[i]])[None]
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float() / 0.7
            ref = torch.log_softmax(logits, -1).gather(-1, completion_ids[i][:, None]).squeeze(-1)
            m = mask[i].bool()
            assert torch.allclose(ours[i][m], ref[m], atol=1e-4)
