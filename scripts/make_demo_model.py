#!/usr/bin/env python3
"""Writes a tiny random Llama model and four PEFT LoRA adapters for demos and end-to-end tests.

  python3 scripts/make_demo_model.py OUT_DIR [--check]

Needs only numpy (Debian's python3-numpy). Deterministic (seeded). Writes
  OUT_DIR/model/{config.json, model.safetensors (BF16), tokenizer.json}
  OUT_DIR/adapters/{upper,reverse,shift,sorter}/{adapter_config.json, adapter_model.safetensors}
The tokenizer is tests/fixtures/tokenizer/tokenizer.json. Weights are random (a later step trains
real adapters); their scales are chosen so greedy decoding does not collapse onto one token and so
every adapter changes the greedy output. --check runs a numpy reference forward pass (float64
over the BF16-rounded weights), prints the greedy continuation of two prompts for the base model
and each adapter, fails unless they are varied and every adapter changes them, and writes them
with the first step's logits to OUT_DIR/reference.json for parity tests of the executors.
"""

import argparse
import json
import os
import re
import shutil
import struct
import sys

import numpy as np

SEED = 20240601
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures", "tokenizer", "tokenizer.json")
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
MAX_POS = 512

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP

# name -> r, lora_alpha, targets, use_rslora, rank_pattern, alpha_pattern
ADAPTERS = {
    "upper": dict(r=8, alpha=16, targets=ATTN, rslora=False, rank_pattern={}, alpha_pattern={}),
    "reverse": dict(r=16, alpha=32, targets=ALL, rslora=True, rank_pattern={}, alpha_pattern={}),
    "shift": dict(r=4, alpha=8, targets=MLP, rslora=False, rank_pattern={}, alpha_pattern={}),
    "sorter": dict(r=32, alpha=32, targets=ALL, rslora=False,
                   rank_pattern={"q_proj": 16, "layers.1.mlp.down_proj": 8},
                   alpha_pattern={"q_proj": 8}),
}


def proj_shape(name):
    """[out, in] of one projection."""
    return {
        "q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "gate_proj": (INTERMEDIATE, HIDDEN),
        "up_proj": (INTERMEDIATE, HIDDEN),
        "down_proj": (HIDDEN, INTERMEDIATE),
    }[name]


def module_path(layer, proj):
    block = "self_attn" if proj in ATTN else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def pattern_value(patterns, module, default):
    # PEFT matches a rank_pattern/alpha_pattern key as a suffix of the module's dotted name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def to_bf16_bits(a):
    """float32 array -> uint16 BF16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_round(a):
    """The float32 value a BF16 store of `a` reads back as."""
    return (to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors):
    """tensors: dict name -> float32 array, stored as BF16 in sorted-name order."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        data = to_bf16_bits(tensors[name]).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)


def tokenizer_info():
    with open(TOKENIZER_FIXTURE, encoding="utf-8") as f:
        tok = json.load(f)
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok["added_tokens"]]
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab = max(ids) + 1
    return -(-vocab // 8) * 8, added[BOS_TOKEN], added[EOS_TOKEN]


def make_base(rng, vocab):
    w = {}
    # Large embeddings next to modest layer outputs keep each step's logits dominated by the
    # current token (a random permutation-like map) plus context, so greedy decoding wanders
    # instead of repeating one token.
    w["model.embed_tokens.weight"] = rng.normal(0.0, 1.0, (vocab, HIDDEN))
    for i in range(LAYERS):
        for proj in ALL:
            out_f, in_f = proj_shape(proj)
            std = 0.7 / np.sqrt(in_f)
            w[module_path(i, proj) + ".weight"] = rng.normal(0.0, std, (out_f, in_f))
        # Norm weights near one but not one, so a loader that ignores them is caught.
        w[f"model.layers.{i}.input_layernorm.weight"] = 1.0 + rng.normal(0.0, 0.1, HIDDEN)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = 1.0 + rng.normal(0.0, 0.1, HIDDEN)
    w["model.norm.weight"] = 1.0 + rng.normal(0.0, 0.1, HIDDEN)
    w["lm_head.weight"] = rng.normal(0.0, 2.0 / np.sqrt(HIDDEN), (vocab, HIDDEN))
    return {k: bf16_round(v.astype(np.float32)) for k, v in w.items()}


def module_rank_alpha(spec, module):
    r = pattern_value(spec["rank_pattern"], module, spec["r"])
    alpha = pattern_value(spec["alpha_pattern"], module, spec["alpha"])
    return r, alpha


def module_scale(spec, module):
    r, alpha = module_rank_alpha(spec, module)
    return alpha / np.sqrt(r) if spec["rslora"] else alpha / r


def make_adapter(rng, spec):
    w = {}
    for i in range(LAYERS):
        for proj in spec["targets"]:
            module = module_path(i, proj)
            r, _ = module_rank_alpha(spec, module)
            out_f, in_f = proj_shape(proj)
            # Sized so scale * B @ A changes a projection's output by about as much as the base
            # weight does, whatever the rank and scale: enough to move greedy outputs.
            b_std = 0.7 / (module_scale(spec, module) * np.sqrt(r))
            key = "base_model.model." + module
            w[key + ".lora_A.weight"] = rng.normal(0.0, 1.0 / np.sqrt(in_f), (r, in_f))
            w[key + ".lora_B.weight"] = rng.normal(0.0, b_std, (out_f, r))
    return {k: bf16_round(v.astype(np.float32)) for k, v in w.items()}


def adapter_config(spec):
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "loraplex-demo-tiny-llama",
        "r": spec["r"],
        "lora_alpha": spec["alpha"],
        "lora_dropout": 0.0,
        "target_modules": sorted(spec["targets"]),
        "use_rslora": spec["rslora"],
        "rank_pattern": spec["rank_pattern"],
        "alpha_pattern": spec["alpha_pattern"],
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def model_config(vocab, bos, eos):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
    }


def rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * w


def rope(x, positions):
    """x [T, heads, head_dim]; rotate-half RoPE as in HF Llama."""
    inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    ang = np.outer(positions, inv_freq)  # [T, head_dim/2]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[:, None, :]
    half = HEAD_DIM // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def forward(base, adapter, spec, ids):
    """Logits of the last position, no KV cache (tiny model)."""
    def linear(x, layer, proj):
        module = module_path(layer, proj)
        y = x @ base[module + ".weight"].T
        if adapter is not None and proj in spec["targets"]:
            key = "base_model.model." + module
            a, b = adapter[key + ".lora_A.weight"], adapter[key + ".lora_B.weight"]
            y = y + module_scale(spec, module) * (x @ a.T) @ b.T
        return y

    t = len(ids)
    x = base["model.embed_tokens.weight"][ids].astype(np.float64)
    pos = np.arange(t)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(LAYERS):
        h = rms_norm(x, base[f"model.layers.{i}.input_layernorm.weight"])
        q = rope(linear(h, i, "q_proj").reshape(t, HEADS, HEAD_DIM), pos)
        k = rope(linear(h, i, "k_proj").reshape(t, KV_HEADS, HEAD_DIM), pos)
        v = linear(h, i, "v_proj").reshape(t, KV_HEADS, HEAD_DIM)
        group = HEADS // KV_HEADS
        out = np.zeros((t, HEADS, HEAD_DIM))
        for hd in range(HEADS):
            s = q[:, hd] @ k[:, hd // group].T / np.sqrt(HEAD_DIM) + mask
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[:, hd] = p @ v[:, hd // group]
        x = x + linear(out.reshape(t, HEADS * HEAD_DIM), i, "o_proj")
        h = rms_norm(x, base[f"model.layers.{i}.post_attention_layernorm.weight"])
        gate = linear(h, i, "gate_proj")
        x = x + linear(gate / (1.0 + np.exp(-gate)) * linear(h, i, "up_proj"), i, "down_proj")
    x = rms_norm(x, base["model.norm.weight"])
    return x[-1] @ base["lm_head.weight"].T


def greedy(base, adapter, spec, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(forward(base, adapter, spec, ids))))
    return ids[len(prompt):]


def check(base, adapters, bos, vocab, reference_path):
    rng = np.random.default_rng(7)
    prompts = [[bos] + [int(t) for t in rng.integers(2, vocab, size=n)] for n in (3, 8)]
    configs = [("", None, None)] + [(name, w, spec) for name, (spec, w) in adapters.items()]
    reference = {"steps": 16, "cases": []}
    ok = True
    for prompt in prompts:
        print(f"prompt {prompt}")
        base_out = None
        for name, weights, spec in configs:
            out = greedy(base, weights, spec, prompt, reference["steps"])
            print(f"  {name or 'base':7s} {out}  distinct={len(set(out))}")
            if weights is None:
                base_out = out
                ok &= len(set(out)) >= 4
            else:
                ok &= out != base_out
            logits = forward(base, weights, spec, prompt)
            reference["cases"].append({"adapter": name, "prompt": prompt, "greedy": out,
                                       "first_logits": [round(float(x), 5) for x in logits]})
    with open(reference_path, "w") as f:
        json.dump(reference, f)
    print(reference_path)
    print("check", "passed" if ok else "FAILED")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--check", action="store_true",
                        help="run a numpy forward pass and print greedy outputs")
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    vocab, bos, eos = tokenizer_info()
    model_dir = os.path.join(args.out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    written = []

    base = make_base(rng, vocab)
    path = os.path.join(model_dir, "config.json")
    with open(path, "w") as f:
        json.dump(model_config(vocab, bos, eos), f, indent=2)
    written.append(path)
    path = os.path.join(model_dir, "model.safetensors")
    write_safetensors(path, base)
    written.append(path)
    path = os.path.join(model_dir, "tokenizer.json")
    shutil.copyfile(TOKENIZER_FIXTURE, path)
    written.append(path)

    adapters = {}
    for name, spec in ADAPTERS.items():
        adir = os.path.join(args.out_dir, "adapters", name)
        os.makedirs(adir, exist_ok=True)
        weights = make_adapter(rng, spec)
        adapters[name] = (spec, weights)
        path = os.path.join(adir, "adapter_config.json")
        with open(path, "w") as f:
            json.dump(adapter_config(spec), f, indent=2)
        written.append(path)
        path = os.path.join(adir, "adapter_model.safetensors")
        write_safetensors(path, weights)
        written.append(path)

    for path in written:
        print(path)
    reference_path = os.path.join(args.out_dir, "reference.json")
    if args.check and not check(base, adapters, bos, vocab, reference_path):
        sys.exit(1)


if __name__ == "__main__":
    main()
