"""Train the package's small Qwen2-MoE (moecompress/data/qwen2moe-tiny) from scratch, deterministically, on CPU.

The model: transformers' Qwen2MoeForCausalLM, 4 layers, hidden 128, 4 heads (2 kv), 16 routed SwiGLU experts of
width 128 (a multiple of the group size 64) with top-4 routing (softmax over all experts, top-4 weights not renormalised, as Qwen1.5-MoE), plus one
shared SwiGLU expert of width 256 scaled by its sigmoid shared_expert_gate, in every layer; the demo model's
byte-level BPE tokenizer (4096 tokens), untied embeddings. Stored in bf16 like the demo model.

The data: the first 150,000 characters of each of the fixture's calib_{prose,verse,c,python}.txt, i.e. exactly
the package's calibration text calib_mix.txt (206 k tokens). Never the *_test texts, and never the tails of the
calib_<domain>.txt beyond character 150,000 (benchmarks/quality.py's validation split).

The target: by default the demo model's next-token distributions (knowledge distillation, KL(teacher || student)
per position; `--teacher none`: plain cross-entropy on the text). Trained on 206 k tokens with hard labels, this
model overfits (validation 5.1 nats on prose); the teacher's soft targets carry what it learned from 10.4 M tokens
(validation 3.9 nats on prose after the same steps).

The training: every step a batch of --batch windows of --seqlen tokens, an equal number from each domain, at
offsets drawn from a torch.Generator seeded with --seed; AdamW (betas 0.9/0.95, weight decay 0.1, on matrices
only), linear warm-up over the first 5% of steps then a cosine decay to 10% of --lr, gradient clipping at 1.0;
loss = KL to the teacher (or cross-entropy) + 0.01 x the router's load-balancing loss (transformers' own aux loss). One torch thread and
a fixed step count make the run bit-reproducible on the same torch build. The loss is printed every --log steps.

    OMP_NUM_THREADS=1 python benchmarks/train_qwen2moe_fixture.py --out moecompress/data/qwen2moe-tiny
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
TEXT = os.path.join(ROOT, "..", "shared", "fixtures", "text")
DEMO = os.path.join(ROOT, "moecompress", "data", "demo-model")
DOMAINS = ("prose", "verse", "c", "python")
HEAD = 150_000  # characters of each calib_<domain>.txt trained on (the rest is the validation split)


def make_config(seqlen: int):
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max(1024, seqlen), rms_norm_eps=1e-5,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=256,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, router_aux_loss_coef=0.01,
        output_router_logits=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        attention_dropout=0.0, use_sliding_window=False)


def load_tokens(tok) -> list[torch.Tensor]:
    out = []
    for d in DOMAINS:
        with open(os.path.join(TEXT, f"calib_{d}.txt"), encoding="utf-8") as f:
            text = f.read()[:HEAD]
        out.append(torch.tensor(tok(text).input_ids, dtype=torch.long))
    return out


def batch(tokens: list[torch.Tensor], n: int, seqlen: int, g: torch.Generator) -> torch.Tensor:
    rows = []
    for i in range(n):
        t = tokens[i % len(tokens)]
        start = int(torch.randint(0, len(t) - seqlen, (1,), generator=g))
        rows.append(t[start:start + seqlen])
    return torch.stack(rows)


def validation_tokens(tok) -> torch.Tensor:
    """[4 domains x 8 windows, 256]: the first 2,048 tokens of each calib_<domain>.txt tail (monitoring only)."""
    rows = []
    for d in DOMAINS:
        with open(os.path.join(TEXT, f"calib_{d}.txt"), encoding="utf-8") as f:
            t = torch.tensor(tok(f.read()[HEAD:HEAD + 20_000]).input_ids[:2048], dtype=torch.long)
        rows.append(t.view(8, 256))
    return torch.cat(rows)


@torch.no_grad()
def val_ce(model, v: torch.Tensor) -> list[float]:
    model.eval()
    ce = [model(input_ids=v[i:i + 8], labels=v[i:i + 8]).loss.item() for i in range(0, len(v), 8)]
    model.train()
    return ce


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", type=int, default=20)
    ap.add_argument("--teacher", default=DEMO,
                    help="distil from this causal LM's next-token distributions (default: the demo model); 'none': "
                         "plain cross-entropy on the text")
    ap.add_argument("--val-every", type=int, default=0,
                    help="print the cross-entropy on the first 2,048 tokens of each validation tail every N steps")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    from transformers import PreTrainedTokenizerFast, Qwen2MoeForCausalLM
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(DEMO, "tokenizer.json"))
    tokens = load_tokens(tok)
    print("training tokens per domain:", dict(zip(DOMAINS, (len(t) for t in tokens))), flush=True)
    model = Qwen2MoeForCausalLM(make_config(a.seqlen)).float()
    teacher = None
    if a.teacher != "none":
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
        print("distilling from", a.teacher, flush=True)
    n_all = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"parameters {n_all / 1e6:.2f} M, routed experts {n_exp / 1e6:.2f} M", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(a.seed)
    v = validation_tokens(tok) if a.val_every else None
    model.train()
    t0, run = time.time(), 0.0
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr)
        x = batch(tokens, a.batch, a.seqlen, g)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        loss = out.loss
        if teacher is not None:  # soft targets: KL(teacher || student) per position, in nats per token
            with torch.no_grad():
                pt = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
            kd = (pt.exp() * (pt - torch.log_softmax(out.logits.float(), -1))).sum(-1).mean()
            loss = kd + model.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce = (out.loss - model.router_aux_loss_coef * out.aux_loss).item()
        run = ce if step == 0 else 0.9 * run + 0.1 * ce
        if (step + 1) % a.log == 0 or step == 0 or step + 1 == a.steps:
            print(f"step {step + 1}/{a.steps} lr {group['lr']:.2e} ce {ce:.4f} (ema {run:.4f}) "
                  f"aux {out.aux_loss.item():.3f} {time.time() - t0:.0f} s", flush=True)
        if a.val_every and ((step + 1) % a.val_every == 0 or step + 1 == a.steps):
            print("  validation ce", " ".join(f"{d} {c:.3f}" for d, c in zip(DOMAINS, val_ce(model, v))), flush=True)
    print(f"final training cross-entropy (ema) {run:.4f}", flush=True)
    model.eval()
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, f), os.path.join(a.out, f))
    print("saved", a.out, sorted(os.listdir(a.out)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
