#!/usr/bin/env python3
"""Parity of Pith's Hugging Face interop with transformers itself (docs/interop.md).

For each family (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V2 with and without q_lora_rank, DeepSeek-V3,
GPT-OSS): build a tiny random model with transformers (the group-topk, sigmoid-bias and clamped-swiglu plugins
must lie beside pith)
(vocab 128, hidden 64, 2 layers, 4 heads, 2 kv heads, 8 experts, top-2), save_pretrained it
sharded, `pith import hf` it (and, where transformers can, the fused-experts save too), compare
`pith eval-logits` with transformers' logits and loss, train Pith a few steps from it
(`train.init_from`), `pith export hf` the result, load that with from_pretrained (no missing or
unexpected keys), compare logits again, and compare greedy generation. Then training itself:
STEPS optimizer steps of Pith (adamw, clip 1.0) and of transformers' model with torch.optim.AdamW
(same betas, eps, lr, weight decay on matrices but biases, clip_grad_norm_ 1.0) on the same token
shard give the same loss at every step. One PASS/FAIL line per family; exit status 1 on any
failure.

Tolerance (both sides compute in float32; only summation order differs): max |Δlogit| <= 1e-4
and |Δloss| <= 1e-5; per-step training losses within TRAIN_TOL (Adam's normalised steps
amplify summation-order noise a little each step).

    python3 scripts/hf_parity.py target/release/pith [--work DIR] [--families qwen3_moe,mixtral,olmoe,qwen2_moe,deepseek_v2,deepseek_v2_q_lora,deepseek_v3,gpt_oss]
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM

LOGIT_TOL, LOSS_TOL = 1e-4, 1e-5
TRAIN_TOL, STEPS, BATCH, SEQ = 1e-4, 6, 2, 32
COMMON = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
    use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
YARN = dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=16, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, moe_intermediate_size=32,
                                         intermediate_size=128, norm_topk_prob=True, rope_theta=1e6)),
    "mixtral": ("MixtralConfig", dict(head_dim=16, num_local_experts=8, intermediate_size=32)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, intermediate_size=32, norm_topk_prob=False, rope_theta=5e5)),
    # q/k/v biases and a shared expert with a sigmoid gate per token
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         intermediate_size=128, norm_topk_prob=False, rope_theta=1e6)),
    # multi-head latent attention (q·k heads 16 = 8 + 8 rotated, interleaved; values 12; kv rank 16),
    # a dense first layer (FFN 128), two shared experts, un-renormalised softmax gates scaled by 2.5,
    # YaRN RoPE (V2-Lite's mscales: the scores scaled by m²); then with the compressed q (V2's
    # q_lora_rank), mscales that also scale cos and sin, and V2's group-limited routing (the
    # group-topk plugin: 4 groups, keep 2)
    "deepseek_v2": ("DeepseekV2Config", dict(num_key_value_heads=4, n_routed_experts=8, moe_intermediate_size=32,
                                             n_shared_experts=2, intermediate_size=128, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                                             first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=2.5,
                                             norm_topk_prob=False, rope_parameters=YARN)),
}
# sigmoid routing with the correction bias over 4 groups of 2 experts keeping 2, normalised gates
# scaled by 2.5, one shared expert, compressed q, a dense first layer, YaRN
FAMILIES["deepseek_v3"] = ("DeepseekV3Config", dict(num_key_value_heads=4, n_routed_experts=8, moe_intermediate_size=32,
                                                    n_shared_experts=1, intermediate_size=128, kv_lora_rank=16,
                                                    q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                    v_head_dim=12, first_k_dense_replace=1, n_group=4, topk_group=2,
                                                    norm_topk_prob=True, routed_scaling_factor=2.5,
                                                    rope_interleave=True, rope_parameters=YARN))
# q/k/v/o biases, sinks, a sliding window of 8 on layer 0 (transformers' default layer_types), a router
# with a bias, the clamped SwiGLU (limit 1: the clamps cut), YaRN without truncation
FAMILIES["gpt_oss"] = ("GptOssConfig", dict(head_dim=16, num_local_experts=8, intermediate_size=32, sliding_window=8,
                                            swiglu_limit=1.0, attention_bias=True,
                                            rope_parameters=dict(rope_type="yarn", rope_theta=1.5e5, factor=4.0,
                                                                 original_max_position_embeddings=16, beta_fast=32,
                                                                 beta_slow=1, truncate=False)))
FAMILIES["deepseek_v2_q_lora"] = ("DeepseekV2Config", {**FAMILIES["deepseek_v2"][1], "q_lora_rank": 24,
                                                       "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.8},
                                                       "topk_method": "group_limited_greedy", "n_group": 4,
                                                       "topk_group": 2})


def pith(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True, env={**os.environ, "PITH_LOG": "warn"})
    if r.returncode != 0:
        raise RuntimeError(f"pith {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def pith_logits(binary, model, tokens):
    out = json.loads(pith(binary, "eval-logits", model, "--tokens", ",".join(map(str, tokens))))
    return torch.tensor(out["logits"], dtype=torch.float32), out["loss"]


def hf_logits(model, tokens):
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.logits[0].float(), out.loss.item()


def compare(what, hf, pt):
    dl = (hf[0] - pt[0]).abs().max().item()
    dloss = abs(hf[1] - pt[1])
    if not (dl <= LOGIT_TOL and dloss <= LOSS_TOL):
        raise AssertionError(f"{what}: max |Δlogit| {dl:.3g} (tol {LOGIT_TOL}), |Δloss| {dloss:.3g} (tol {LOSS_TOL})")
    return dl, dloss


def randomise(model):
    """O(1) logits and decisive routing: matrices N(0, 0.1²), routers N(0, 0.5²), norms 1 + N(0, 0.1²)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".gate.weight") or name.endswith(".router.weight"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.1)
        # DeepSeek-V3's correction bias (a buffer, zero at init): values that change the choice.
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)


def honour_swiglu(model):
    """transformers up to 5.17 hard-codes GPT-OSS's alpha 1.702 and limit 7 in its experts; later versions
    read swiglu_alpha and swiglu_limit from the config, as Pith does. Set them from the config so that
    every version computes the model the config describes."""
    c = model.config
    for m in model.modules():
        if type(m).__name__ == "GptOssExperts":
            m.alpha, m.limit = getattr(c, "swiglu_alpha", 1.702), getattr(c, "swiglu_limit", 7.0)
    return model


def layout(folder):
    from safetensors import safe_open
    names = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as s:
                names += list(s.keys())
    return "fused" if any(n.endswith("experts.gate_up_proj") for n in names) else "per-expert"


def load(folder):
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                           output_loading_info=True)
    except TypeError:
        model, info = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                           attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise AssertionError(f"from_pretrained({folder}): {bad}")
    return honour_swiglu(model).eval()


def greedy_pith(binary, model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = pith_logits(binary, model, seq)
        seq.append(int(logits[-1].argmax()))
    return seq


def write_shard(path, tokens):
    """A Pith token shard (host/src/data/shards.rs): 256 i32 header (magic, version 1, count), u16 tokens."""
    header = torch.zeros(256, dtype=torch.int32)
    header[:3] = torch.tensor([20240520, 1, len(tokens)])
    with open(path, "wb") as f:
        f.write(header.numpy().tobytes())
        f.write(torch.tensor(tokens, dtype=torch.int16).numpy().tobytes())


def without_balance_losses(config_toml, out):
    """The imported config without its [[balance_loss]] tables: transformers adds no auxiliary loss
    unless output_router_logits is set, and then sums it over layers differently."""
    kept, skipping = [], False
    for line in open(config_toml).read().splitlines():
        if line.startswith("["):
            skipping = line.strip() == "[[balance_loss]]"
        if not skipping:
            kept.append(line)
    open(out, "w").write("\n".join(kept) + "\n")
    return out


def mxfp4_parity(binary, model, hf_dir, d, tokens):
    """GPT-OSS ships its experts in MXFP4: random FP4 blocks and scales, dequantized by transformers
    into a copy of the model, against Pith reading the blocks and scales themselves."""
    import copy
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(7)
    model = copy.deepcopy(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    packed = {}
    for name in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, fan_in, fan_out = sd[name].shape
        blocks = torch.randint(0, 256, (e, fan_out, fan_in // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(120, 128, (e, fan_out, fan_in // 32), dtype=torch.uint8, generator=g)
        sd[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        packed.update({name + "_blocks": blocks, name + "_scales": scales})
    model.load_state_dict(sd)
    ref = hf_logits(model, tokens)
    folder = os.path.join(d, "hf-mxfp4")
    os.makedirs(folder, exist_ok=True)
    plain = {k: v.contiguous() for k, v in sd.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**plain, **packed}, os.path.join(folder, "model.safetensors"))
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    dl, _ = compare("MXFP4 experts", ref, pith_logits(binary, folder, tokens))
    return f"MXFP4 experts dequantized max|Δlogit| {dl:.2e}"


def train_parity(binary, model, hf_dir, run0, d, seed):
    """Per-step losses of Pith's adamw and torch.optim.AdamW from the same weights on the same batches."""
    g = torch.Generator().manual_seed(seed + 100)
    tokens = torch.randint(0, COMMON["vocab_size"], (STEPS * BATCH * SEQ + 1,), generator=g).tolist()
    shard, run = os.path.join(d, "train.bin"), os.path.join(d, "train-parity")
    write_shard(shard, tokens)
    lr, wd, betas, eps = 2e-3, 0.1, (0.9, 0.95), 1e-8
    sets = [f'train.out="{run}"', f'train.init_from="{hf_dir}"', f"train.steps={STEPS}", f"train.micro_batch={BATCH}",
            f"train.lr={lr}", "train.warmup=0", 'train.schedule="constant"', "train.clip=1.0", "train.eval_batches=1",
            f'data.source="{shard}"', f'data.val="{shard}"', f"model.seq_len={SEQ}", f"optimizer.beta1={betas[0]}", f"optimizer.beta2={betas[1]}",
            f"optimizer.eps={eps}", f"optimizer.weight_decay={wd}"]
    cfg = without_balance_losses(os.path.join(run0, "config.toml"), os.path.join(d, "train-parity.toml"))
    pith(binary, "train", cfg, *[a for s in sets for a in ("--set", s)])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    pith_losses = [r["loss"] for r in rows if "loss" in r and "step" in r][:STEPS]

    model = model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    decay = [p.dim() >= 2 and not n.endswith("bias") for n, p in named]
    groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": wd},
              {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    torch_losses = []
    for step in range(STEPS):
        rows = [tokens[(step * BATCH + r) * SEQ:(step * BATCH + r) * SEQ + SEQ + 1] for r in range(BATCH)]
        x = torch.tensor([w[:-1] for w in rows])
        y = torch.tensor([w[1:] for w in rows])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch_losses.append(loss.item())
    model.eval()
    worst = max(abs(a - b) for a, b in zip(pith_losses, torch_losses))
    if len(pith_losses) != STEPS or worst > TRAIN_TOL:
        raise AssertionError(f"training: Pith losses {pith_losses} vs torch {torch_losses} (max |Δ| {worst:.3g}, "
                             f"tol {TRAIN_TOL})")
    return f"{STEPS} AdamW steps: losses {torch_losses[0]:.4f} → {torch_losses[-1]:.4f}, max |Δloss| {worst:.2e}"


def family(binary, name, work, seed):
    cls, extra = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**COMMON, **extra})
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except TypeError:
        model = AutoModelForCausalLM.from_config(cfg)
    model = honour_swiglu(model.float().eval())
    randomise(model)
    d = os.path.join(work, name)
    hf_dir, run0, trained, exported = (os.path.join(d, x) for x in ("hf", "imported", "trained", "exported"))
    model.save_pretrained(hf_dir, max_shard_size="100KB")
    shards = sum(f.endswith(".safetensors") for f in os.listdir(hf_dir))
    saved = layout(hf_dir)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, COMMON["vocab_size"], (24,), generator=g).tolist()

    # Import, and compare with transformers on the same tokens.
    pith(binary, "import", "hf", hf_dir, "--out", run0, "--seq-len", "32")
    ref = hf_logits(model, tokens)
    d1 = compare("imported checkpoint", ref, pith_logits(binary, run0, tokens))
    compare("HF folder read directly", ref, pith_logits(binary, hf_dir, tokens))
    note = f"saved {saved} in {shards} files"
    if name == "gpt_oss":
        note += "; " + mxfp4_parity(binary, model, hf_dir, d, tokens)
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        fused_dir = os.path.join(d, "hf-fused")
        model.save_pretrained(fused_dir, save_original_format=False)
        got = pith_logits(binary, fused_dir, tokens)
        compare(f"{layout(fused_dir)} save", ref, got)
        note += f", {layout(fused_dir)} save too"

    # Train from it, export, load with transformers, compare again.
    sets = [f'train.out="{trained}"', f'train.init_from="{hf_dir}"', "train.steps=5", "train.micro_batch=2",
            "train.lr=3e-3", "train.warmup=0", "train.eval_batches=1"]
    pith(binary, "train", os.path.join(run0, "config.toml"), *[a for s in sets for a in ("--set", s)])
    pith(binary, "export", "hf", trained, exported, "--max-shard-size", "100KB")
    back = load(exported)
    after = pith_logits(binary, trained, tokens)
    moved = (after[0] - ref[0]).abs().max().item()
    if moved < 1e-3:
        raise AssertionError(f"training moved the logits by only {moved:.3g}")
    d2 = compare("exported after training", hf_logits(back, tokens), after)

    # Greedy generation: transformers on the export vs Pith's argmax, token by token.
    prompt, n = tokens[:8], 8
    with torch.no_grad():
        out = back.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)
    hf_seq = out[0].tolist()
    pt_seq = greedy_pith(binary, trained, prompt, n)
    if hf_seq != pt_seq:
        i = next(i for i, (a, b) in enumerate(zip(hf_seq, pt_seq)) if a != b)
        row = hf_logits(back, hf_seq[:i])[0][-1]
        gap = (row[hf_seq[i]] - row[pt_seq[i]]).item()
        if gap > 1e-4:
            raise AssertionError(f"generation differs at token {i}: transformers {hf_seq[len(prompt):]} vs "
                                 f"Pith {pt_seq[len(prompt):]} (logit gap {gap:.3g})")
        note += f"; generation agrees up to a near-tie at token {i} (gap {gap:.2g})"
    note += "; " + train_parity(binary, load(hf_dir), hf_dir, run0, d, seed)
    text = (f"import max|Δlogit| {d1[0]:.2e} |Δloss| {d1[1]:.2e}; after 5 steps + export max|Δlogit| {d2[0]:.2e} "
            f"|Δloss| {d2[1]:.2e} (training moved logits {moved:.2f}); greedy {n} tokens {hf_seq[len(prompt):]} equal; "
            f"{note}")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pith", help="path to the pith binary")
    ap.add_argument("--work", help="working directory (default: a new temp directory)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="pith-hf-parity-")
    os.makedirs(work, exist_ok=True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; work dir {work}", flush=True)
    failed = 0
    for i, name in enumerate(a.families.split(",")):
        try:
            print(f"PASS {name}: {family(a.pith, name, work, seed=i + 1)}", flush=True)
        except Exception as e:  # noqa: BLE001 - one line per family, whatever broke
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}".replace("\n", " "), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
