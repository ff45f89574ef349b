#!/usr/bin/env python3
"""Writes a random-weight Llama-3-8B-shaped Hugging Face checkpoint and random PEFT adapters.

For the step benchmark (bench/step_bench.cc) and the transformers + PEFT baseline
(bench/hf_peft_baseline.py); runs on the GPU host, where torch draws the weights on the GPU.

  OUT/model/      config.json, model-0000N-of-0000M.safetensors (~4 GB bf16 shards) + index,
                  tokenizer.json (byte-level BPE over the 256 bytes, no merges: one token a byte,
                  ids 0..255, <|begin_of_text|> 256 and <|end_of_text|> 257), so the daemon can
                  serve the checkpoint (bench/gpu_daemon_bench.sh)
  OUT/adapters/   r16_0..r16_{R-1} (rank 16), mix_0..mix_{M-1} (ranks 8, 16, 32, 64 in turn) and
                  r64_0..r64_{N-1} (rank 64: with r16_0.. the uniform-rank batches that the mixed
                  one is compared with), every adapter targeting all seven projections,
                  lora_alpha = 2 * r

Weights are normal with std 0.02 (norm weights 1), lora_A and lora_B likewise (PEFT initialises
B to zero; random B makes the delta real). --tiny writes the same layout at toy sizes (hidden 64,
2 layers) on the CPU, to smoke-test the benchmark without a GPU. Usage:
  make_bench_checkpoint.py OUT [--layers 32] [--r16 32] [--mixed 8] [--r64 8] [--seed 0] [--tiny]
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

SHARD_BYTES = 4 << 30
STD = 0.02
LLAMA3_8B = dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
TINY = dict(hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16, vocab=512)
D = dict(LLAMA3_8B)
DEVICE = "cuda"


def proj_shapes():
    """name: (module path, out_features, in_features)"""
    return {
        "q_proj": ("self_attn", D["heads"] * D["head_dim"], D["hidden"]),
        "k_proj": ("self_attn", D["kv_heads"] * D["head_dim"], D["hidden"]),
        "v_proj": ("self_attn", D["kv_heads"] * D["head_dim"], D["hidden"]),
        "o_proj": ("self_attn", D["hidden"], D["heads"] * D["head_dim"]),
        "gate_proj": ("mlp", D["inter"], D["hidden"]),
        "up_proj": ("mlp", D["inter"], D["hidden"]),
        "down_proj": ("mlp", D["hidden"], D["inter"]),
    }


def config(layers):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": D["hidden"],
        "intermediate_size": D["inter"],
        "num_hidden_layers": layers,
        "num_attention_heads": D["heads"],
        "num_key_value_heads": D["kv_heads"],
        "head_dim": D["head_dim"],
        "vocab_size": D["vocab"],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }


def randn(shape, gen):
    # Drawn on the GPU (seconds for 16 GB instead of minutes on the CPU), then moved to the host.
    return (torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.bfloat16) * STD).cpu()


def model_tensors(layers):
    """Yields (name, shape, is_norm) in checkpoint order."""
    yield "model.embed_tokens.weight", (D["vocab"], D["hidden"]), False
    for layer in range(layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (D["hidden"],), True
        yield p + "post_attention_layernorm.weight", (D["hidden"],), True
        for proj, (module, out_f, in_f) in proj_shapes().items():
            yield f"{p}{module}.{proj}.weight", (out_f, in_f), False
    yield "model.norm.weight", (D["hidden"],), True
    yield "lm_head.weight", (D["vocab"], D["hidden"]), False


def write_model(out, layers, gen):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config(layers), f, indent=2)
    # Plan shards first so the file names carry the shard count.
    plan, shard, size = [], [], 0
    for name, shape, is_norm in model_tensors(layers):
        nbytes = 2 * torch.Size(shape).numel()
        if shard and size + nbytes > SHARD_BYTES:
            plan.append(shard)
            shard, size = [], 0
        shard.append((name, shape, is_norm))
        size += nbytes
    plan.append(shard)
    weight_map, total = {}, 0
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, shape, is_norm in shard:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16) if is_norm else randn(shape, gen)
            weight_map[name] = fname
            total += 2 * tensors[name].numel()
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total


def write_adapter(out, base_dir, layers, rank, gen):
    os.makedirs(out, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for proj, (module, out_f, in_f) in proj_shapes().items():
            p = f"base_model.model.model.layers.{layer}.{module}.{proj}"
            tensors[p + ".lora_A.weight"] = randn((rank, in_f), gen)
            tensors[p + ".lora_B.weight"] = randn((out_f, rank), gen)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_dir,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "target_modules": list(proj_shapes()),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sum(2 * t.numel() for t in tensors.values())


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: each byte's printable stand-in character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer(model_dir):
    """A Llama-3-style tokenizer.json whose vocabulary is the 256 bytes (random weights make any
    vocabulary meaningless; the daemon only needs a valid one)."""
    alphabet = bytes_to_unicode()
    special = [("<|begin_of_text|>", 256), ("<|end_of_text|>", 257)]
    split = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [256],
                                                      "tokens": ["<|begin_of_text|>"]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {alphabet[b]: b for b in range(256)}, "merges": []},
    }
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--r16", type=int, default=32, help="rank-16 adapters r16_0..")
    ap.add_argument("--mixed", type=int, default=8, help="adapters mix_0.. of ranks 8, 16, 32, 64 in turn")
    ap.add_argument("--r64", type=int, default=8, help="rank-64 adapters r64_0..")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    args = ap.parse_args()
    global DEVICE
    if args.tiny:
        D.update(TINY)
        DEVICE = "cpu"
        args.layers = min(args.layers, 2)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(args.seed)
    t0 = time.time()
    model_dir = os.path.join(args.out, "model")
    total = write_model(model_dir, args.layers, gen)
    write_tokenizer(model_dir)
    print(f"model: {total / 1e9:.1f} GB in {time.time() - t0:.1f} s -> {model_dir}", flush=True)
    t1 = time.time()
    adapter_bytes = 0
    names = [(f"r16_{i}", 16) for i in range(args.r16)]
    names += [(f"mix_{i}", (8, 16, 32, 64)[i % 4]) for i in range(args.mixed)]
    names += [(f"r64_{i}", 64) for i in range(args.r64)]
    for name, rank in names:
        adapter_bytes += write_adapter(os.path.join(args.out, "adapters", name), model_dir, args.layers, rank, gen)
    print(f"adapters: {len(names)}, {adapter_bytes / 1e9:.1f} GB in {time.time() - t1:.1f} s", flush=True)


if __name__ == "__main__":
    main()
