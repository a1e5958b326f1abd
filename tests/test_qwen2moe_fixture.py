"""The shipped trained Qwen2-MoE (moecompress/data/qwen2moe-tiny, benchmarks/train_qwen2moe_fixture.py): it loads
with transformers, is the architecture it claims (16 routed experts, top-4, a gated shared expert), it is trained
(perplexity on eval_mix.txt far below an untrained model's), and 4-bit GPTQ with the shared experts kept dense
stays within a few percent of it."""
import json
import os
from importlib import resources

import pytest
import torch

from conftest import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN = os.path.join(str(resources.files("moecompress.data")), "qwen2moe-tiny")
EVAL = os.path.join(TEXT, "eval_mix.txt")
# measured: eval_mix.txt's first 4096 tokens, windows of 256, fp32
PPL_TRAINED = 56.40
PPL_W4 = 56.40


def _ppl(model) -> float:
    from moecompress.evaluate import perplexity
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(QWEN, "tokenizer.json"))
    ids = torch.tensor(tok(open(EVAL, encoding="utf-8").read()).input_ids[:4096])
    return perplexity(model, ids)["perplexity"]


def test_loads_with_transformers_and_is_trained():
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM
    m = AutoModelForCausalLM.from_pretrained(QWEN, dtype=torch.float32, local_files_only=True).eval()
    assert isinstance(m, Qwen2MoeForCausalLM)
    c = m.config
    assert (c.num_experts, c.num_experts_per_tok, c.num_hidden_layers, c.vocab_size) == (16, 4, 4, 4096)
    for layer in m.model.layers:
        assert layer.mlp.shared_expert_gate.weight.shape == (1, c.hidden_size)
        assert layer.mlp.shared_expert.gate_proj.weight.shape == (c.shared_expert_intermediate_size, c.hidden_size)
    assert json.load(open(os.path.join(QWEN, "config.json")))["dtype"] == "bfloat16"
    trained = _ppl(m)
    torch.manual_seed(0)
    untrained = _ppl(Qwen2MoeForCausalLM(c).float().eval())
    assert trained == pytest.approx(PPL_TRAINED, rel=0.01), trained
    assert untrained > 20 * trained, (untrained, trained)


def test_quantize_4bit_shared_dense(tmp_path):
    """`moecompress quantize` at 4 bits, group 64, 8 calibration windows, --shared-bits 0: the routed experts
    packed at 4 bits, the shared experts left as they are, perplexity within 3% of the original."""
    from moecompress.api import evaluate
    from moecompress.cli import main
    out = str(tmp_path / "w4")
    assert main(["-q", "quantize", QWEN, "--out", out, "--bits", "4", "--group-size", "64", "--nsamples", "8",
                 "--seed", "0", "--shared-bits", "0", "--calib", os.path.join(TEXT, "calib_mix.txt")]) == 0
    man = json.load(open(os.path.join(out, "moecompress.json")))
    assert man["expert_bits_per_param"] == 4.5
    assert not any("module" in t for t in man["tensors"])  # no packed shared-expert module: they stay dense
    plan = json.load(open(os.path.join(out, "run", "plan.json")))
    assert len(plan["experts"]) == 4 * 16 and {e["bits"] for e in plan["experts"]} == {4}
    ppl = evaluate(out, [EVAL], max_tokens=4096, progress=False)[EVAL]["perplexity"]
    assert ppl == pytest.approx(PPL_W4, rel=0.01), ppl
    assert ppl < 1.03 * PPL_TRAINED, (ppl, PPL_TRAINED)
