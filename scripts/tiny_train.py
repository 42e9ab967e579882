"""Train the tiny GLM-MoE-DSA checkpoint in the three stages of the DSA recipe (DeepSeek-V3.2 report).

  dense           pretrain the main model with dense causal attention (the indexers are unused).
  indexer_warmup  main model frozen; each layer's indexer learns, by KL divergence, that layer's
                  head-averaged dense attention distribution over all earlier tokens.
  sparse          main model on top-k attention (its own indexer's selection in every layer);
                  each indexer, on detached inputs, learns by KL the main attention over its selected set.
  selfcheck       this file's training forward against stock transformers, on a random tiny model.

Each stage loads the previous stage's checkpoint (bf16 safetensors, `save_pretrained`) and writes its own;
every stage ends by measuring the held-out loss of what it saved through the stock transformers forward,
and appends one JSON line of metrics to --metrics.

Stock `GlmMoeDsaAttention` always masks attention to its indexer's top-k and runs the indexer under
`torch.no_grad`, so training uses its own forward over the model's own modules (`forward` below);
`selfcheck` proves it computes what transformers computes.

    python scripts/tiny_train.py dense --out .work/tiny/ckpt/dense
    python scripts/tiny_train.py indexer_warmup --init .work/tiny/ckpt/dense --out .work/tiny/ckpt/indexer_warmup
    python scripts/tiny_train.py sparse --init .work/tiny/ckpt/indexer_warmup --out .work/tiny/ckpt/sparse
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 1024
STAGES = {
    # lr_*: peak learning rates of the main model / the indexers (0: frozen). steps: the schedule's length
    # (dense: what 235 s bought on an H100 in the first run; --time-budget-s refits it on other machines).
    "dense": dict(lr_main=2e-3, lr_indexer=0.0, warmup=100, steps=2554, attn="dense", kl=None, eval="dense"),
    "indexer_warmup": dict(lr_main=0.0, lr_indexer=1e-3, warmup=20, steps=400, attn="dense", kl="dense", eval="sparse"),
    # A low main-model rate: the train split is small and already seen ~9 times in the dense stage.
    "sparse": dict(lr_main=1e-4, lr_indexer=5e-4, warmup=20, steps=250, attn="sparse", kl="sparse", eval="sparse"),
}


def tiny_config(vocab_size: int, eos_token_id: int, **overrides) -> GlmMoeDsaConfig:
    """16 DSA layers (all Full, all dense MLP), MLA attention, 4 x 64 indexer, top-64 of 1024 tokens."""
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=416,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        index_topk=64,
        index_head_dim=64,
        index_n_heads=4,
        first_k_dense_replace=16,
        tie_word_embeddings=True,
        max_position_embeddings=SEQ_LEN,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return GlmMoeDsaConfig(**(kw | overrides))


def mla_qkv(attn, x, cos, sin):
    """The MLA projections of stock `GlmMoeDsaAttention.forward`.

    x: [B, S, hidden] (after input_layernorm). Returns q, k: [B, H, S, nope + rope], v: [B, H, S, v_dim],
    q_resid: [B, S, q_lora_rank] (the indexer's query input).
    """
    b, s, _ = x.shape
    q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
    q = attn.q_b_proj(q_resid).view(b, s, -1, attn.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    kv_pass, k_rot = torch.split(attn.kv_a_proj_with_mqa(x), [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(kv_pass)).view(b, s, -1, attn.qk_nope_head_dim + attn.v_head_dim)
    k_nope, v = torch.split(kv.transpose(1, 2), [attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot.view(b, 1, s, -1), cos, sin)
    q = torch.cat([q_pass, q_rot], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
    return q, k, v, q_resid


def indexer_scores(indexer, x, q_resid, cos, sin, causal):
    """Stock `GlmMoeDsaIndexer.forward` up to (not including) its top-k, with autograd.

    x: [B, S, hidden], q_resid: [B, S, q_lora_rank], causal: [S, S] bool. Returns [B, S, S] float32
    index scores, -inf where the key is in the future.
    """
    b, s, _ = x.shape
    q = indexer.wq_b(q_resid).view(b, s, indexer.n_heads, indexer.head_dim)
    q_rot, q_pass = torch.split(q, [indexer.qk_rope_head_dim, indexer.head_dim - indexer.qk_rope_head_dim], -1)
    k = indexer.k_norm(indexer.wk(x)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [indexer.qk_rope_head_dim, indexer.head_dim - indexer.qk_rope_head_dim], -1)
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)  # [B, S, H, D]
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)  # [B, S, D]
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * indexer.softmax_scale)
    weights = indexer.weights_proj(x.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads**-0.5
    index = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2).float()  # [B, S, S]
    return index.masked_fill(~causal, float("-inf"))


def kl_to(p, logits, valid):
    """Mean over queries of KL(p || softmax(logits)) over the `valid` keys. p: target, rows sum to 1."""
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)
    return (torch.xlogy(p, p) - p * logq).sum(-1).mean()


def attention_block(attn, x, cos, sin, causal, mode, kl):
    """One layer's attention: returns (output [B, S, hidden], indexer KL or None).

    mode "dense": causal attention over every earlier token. mode "sparse": each query attends to its
    indexer's top-k (stock DSA semantics). kl "dense" / "sparse": the indexer's KL loss against the
    head-averaged attention distribution over all earlier / the selected tokens; the indexer sees detached
    inputs, so this loss trains the indexer alone.
    """
    b, s, _ = x.shape
    q, k, v, q_resid = mla_qkv(attn, x, cos, sin)
    index = None
    if mode == "sparse" or kl is not None:
        with torch.set_grad_enabled(kl is not None):  # on in indexer_warmup, where the rest runs without
            index = indexer_scores(attn.indexer, x.detach(), q_resid.detach(), cos, sin, causal)
    if mode == "dense":
        allowed = causal
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
    else:
        topk = index.detach().topk(min(attn.indexer.index_topk, s), dim=-1).indices  # [B, S, K]
        allowed = torch.zeros_like(index, dtype=torch.bool).scatter_(-1, topk, True) & causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), scale=attn.scaling)
    loss = None
    if kl is not None:
        assert kl == mode, "the KL target is the attention the main model uses"
        with torch.no_grad():
            p = _attn_probs(q, k, allowed.unsqueeze(-3), attn.scaling)
        with torch.enable_grad():
            if kl == "dense":
                loss = kl_to(p, index, causal)
            else:
                loss = kl_to(p.gather(-1, topk), index.gather(-1, topk), allowed.gather(-1, topk))
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)), loss


def _attn_probs(q, k, mask, scaling):
    """Head-averaged attention probabilities [B, S, S] (float32) under a boolean mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).mean(1)


def forward(model, ids, mode="dense", kl=None):
    """ids: [B, S] -> (logits [B, S, V], summed indexer KL over layers or None)."""
    m = model.model
    s = ids.shape[1]
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, torch.arange(s, device=ids.device)[None])
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
    kls = []
    for layer in m.layers:
        out, layer_kl = attention_block(layer.self_attn, layer.input_layernorm(h), cos, sin, causal, mode, kl)
        h = h + out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if layer_kl is not None:
            kls.append(layer_kl)
    logits = model.lm_head(m.norm(h))
    if not kls:
        return logits, None
    with torch.enable_grad():
        return logits, torch.stack(kls).sum()


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# ---------------------------------------------------------------------------------------------- data


def load_tokens(data: Path, split: str, device) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(data / f"{split}.bin", dtype=np.uint16).astype(np.int64)).to(device)


def eval_windows(tokens: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """The first n non-overlapping windows [n, seq_len] of a split (all of them if n is None)."""
    count = tokens.numel() // seq_len if n is None else n
    return tokens[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def eval_loss(model, windows, batch, mode, autocast=True):
    """Mean next-token loss over the windows, every window weighted alike (our training forward)."""
    model.eval()
    losses = []
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits, _ = forward(model, ids, mode)
        losses.append(lm_loss(logits, ids) * len(ids))
    model.train()
    return (torch.stack(losses).sum() / len(windows)).item()


@torch.no_grad()
def stock_eval_loss(ckpt: Path, windows, batch, dense: bool) -> float:
    """Held-out loss of a saved checkpoint through stock transformers (bf16, eager DSA path).

    dense=True loads it with index_topk = window length, so every earlier token is selected.
    """
    extra = {"index_topk": windows.shape[1]} if dense else {}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="eager", **extra)
    model.to(windows.device).eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        total += lm_loss(model(ids).logits, ids).item() * len(ids)
    return total / len(windows)


# ------------------------------------------------------------------------------------------- training


def lr_at(step, total, warmup, peak):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def param_groups(model, lr_main, lr_indexer):
    """AdamW groups: 1-D params (norms) undecayed; frozen parts (lr 0) left out of the optimizer."""
    groups = []
    for is_indexer, lr in ((False, lr_main), (True, lr_indexer)):
        named = [(n, p) for n, p in model.named_parameters() if (".indexer." in n) == is_indexer]
        for _, p in named:
            p.requires_grad_(lr > 0)
        if lr > 0:
            groups.append(dict(params=[p for _, p in named if p.ndim >= 2], weight_decay=0.1, peak=lr))
            groups.append(dict(params=[p for _, p in named if p.ndim < 2], weight_decay=0.0, peak=lr))
    return groups


def train(args):
    torch.manual_seed(args.seed)
    cfg = STAGES[args.stage]
    device = torch.device(args.device)
    meta = json.loads((args.data / "meta.json").read_text())
    if args.init is None:
        model = GlmMoeDsaForCausalLM(tiny_config(meta["vocab_size"], meta["eos_token_id"]))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())

    train_tokens = load_tokens(args.data, "train", device)
    eval_all = eval_windows(load_tokens(args.data, "eval", device), args.seq_len, args.heldout_windows)
    eval_some = eval_all[: args.eval_windows]
    opt = torch.optim.AdamW(
        param_groups(model, cfg["lr_main"], cfg["lr_indexer"]), lr=0.0, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    total = args.steps or cfg["steps"]
    print(
        f"[{args.stage}] {n_params / 1e6:.2f}M params, {len(train_tokens) / 1e6:.2f}M train tokens, "
        f"batch {args.batch} x {args.seq_len}, at most {total} steps / {args.time_budget_s} s",
        flush=True,
    )

    curve, step, t_start, losses = [], 0, time.time(), []
    timed_from, t0 = (10, None) if total > 50 else (0, t_start)
    while step < total:
        if step == timed_from:  # timing starts after the first steps (allocator warm-up, kernel selection)
            torch.cuda.synchronize() if device.type == "cuda" else None
            t0 = time.time()
        if step == 40 and args.time_budget_s and args.steps is None:
            per_step = (time.time() - t0) / 30
            total = min(total, int((args.time_budget_s - (time.time() - t_start)) / per_step) + step)
            print(f"[{args.stage}] {per_step * 1e3:.0f} ms/step -> {total} steps in the budget", flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg["warmup"], g["peak"])
        starts = torch.randint(0, len(train_tokens) - args.seq_len, (args.batch,), device=device, generator=gen)
        ids = train_tokens[starts[:, None] + torch.arange(args.seq_len, device=device)]
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(cfg["lr_main"] > 0):
            logits, kl = forward(model, ids, cfg["attn"], cfg["kl"])
            lm = lm_loss(logits, ids)
        loss = (lm if cfg["lr_main"] > 0 else 0) + (kl if kl is not None else 0)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((lm.detach(), kl.detach() if kl is not None else lm.new_zeros(()), gnorm))
        step += 1
        if step % args.log_every == 0 or step == total:
            lm_v, kl_v, gn = (torch.stack(x).mean().item() for x in zip(*losses, strict=True))
            losses = []
            row = dict(step=step, lm=round(lm_v, 4), kl=round(kl_v, 4), gnorm=round(gn, 3))
            if step % (args.log_every * 5) == 0 or step == total:
                row["eval"] = round(eval_loss(model, eval_some, args.batch, cfg["eval"]), 4)
                curve.append(row)
            print(f"[{args.stage}] {row} lr {opt.param_groups[0]['lr']:.2e} {time.time() - t_start:.0f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t0

    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="12MB")
    result = dict(
        stage=args.stage,
        params=n_params,
        steps=step,
        batch=args.batch,
        seq_len=args.seq_len,
        tokens=step * args.batch * args.seq_len,
        tokens_per_s=round((step - timed_from) * args.batch * args.seq_len / train_s),
        ms_per_step=round(train_s / (step - timed_from) * 1e3, 1),
        curve=curve,
        device=str(device),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        heldout_windows=len(eval_all),
        heldout_dense=stock_eval_loss(args.out, eval_all, args.batch, dense=True),
        heldout_sparse=stock_eval_loss(args.out, eval_all, args.batch, dense=False),
        shard_bytes=sum(f.stat().st_size for f in args.out.glob("*.safetensors")),
    )
    print(json.dumps(result), flush=True)
    with args.metrics.open("a") as f:
        f.write(json.dumps(result) + "\n")


# ------------------------------------------------------------------------------------------ selfcheck


def selfcheck(args):
    """Our forward == stock transformers (fp32, eager) on a random tiny model, dense and sparse."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = tiny_config(512, 0, num_hidden_layers=4, index_topk=16)
    cfg._attn_implementation = "eager"
    model = GlmMoeDsaForCausalLM(cfg).to(device).eval()
    for p in model.parameters():  # init std 0.02 gives near-uniform attention; make it selective
        p.data.mul_(4.0 if p.ndim >= 2 else 1.0)
    ids = torch.randint(0, 512, (2, 200), device=device)
    with torch.no_grad():
        stock_sparse = model(ids).logits
        ours_sparse, _ = forward(model, ids, "sparse")
        model.config.index_topk = 10**6
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = 10**6
        stock_dense = model(ids).logits
        ours_dense, _ = forward(model, ids, "dense")
    gap = (stock_dense - stock_sparse).norm() / stock_dense.norm()
    for name, ours, stock in (("dense", ours_dense, stock_dense), ("sparse", ours_sparse, stock_sparse)):
        err = ((ours - stock).norm() / stock.norm()).item()
        print(f"[selfcheck] {name}: rel err {err:.2e} (dense vs sparse logits differ by {gap:.2e})", flush=True)
        assert err < 1e-4 < gap, (name, err, gap)
    # The KL losses train the indexers and nothing else.
    model.train()
    _, kl = forward(model, ids, "sparse", kl="sparse")
    kl.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad), sorted(with_grad)
    print(f"[selfcheck] indexer KL {kl.item():.3f} reaches {len(with_grad)} indexer tensors only", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "selfcheck"])
    ap.add_argument("--init", type=Path, help="checkpoint of the previous stage (dense: none, random init)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--data", type=Path, default=REPO / ".work" / "tiny" / "tokens")
    ap.add_argument("--metrics", type=Path, default=REPO / ".work" / "tiny" / "metrics.jsonl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="exact number of steps (default: the stage's, capped by the budget)")
    ap.add_argument("--time-budget-s", type=float, help="fit the step count to this many seconds of training")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--eval-windows", type=int, default=64, help="windows for the eval curve during training")
    ap.add_argument("--heldout-windows", type=int, help="windows for the final held-out loss (default: all)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.stage == "selfcheck":
        selfcheck(args)
    else:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        train(args)


if __name__ == "__main__":
    main()
