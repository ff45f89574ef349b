#!/usr/bin/env python3
"""transformers + PEFT decode throughput on the benchmark checkpoint, for side-by-side comparison
with bench/step_bench.cc (same model, same adapters, same batch sizes).

Greedy generation of NEW tokens after a PROMPT-token prompt per request, with the KV cache, timed
with a synchronised clock (median of REPEAT runs after a warm-up). Scenarios per batch size: the
base model, one adapter for every request, and one adapter per request (PEFT's mixed-batch
`adapter_names`, adapters r16_0..r16_{A-1} round-robin; at batch 32 with --adapters 32, 32
distinct adapters: the issue's mixed workload). tokens_per_s counts NEW tokens over the whole
generate call (prefill included); decode_tokens_per_s subtracts a 1-token generate of the same
prompt, so it is the decode rate alone, comparable with step_bench's decode rows. Writes JSON and
prints a table. Usage:
  hf_peft_baseline.py CHECKPOINT_DIR OUT_JSON [--batches 1,32] [--adapters 32] [--new 32] [--prompt 128]
                      [--repeat 3]
CHECKPOINT_DIR is what make_bench_checkpoint.py wrote (model/ and adapters/).
"""
import argparse
import json
import os
import statistics
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def load(checkpoint, num_adapters):
    model_dir = os.path.join(checkpoint, "model")
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    except TypeError:  # transformers < 4.56 names the argument torch_dtype
        base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, device_map="cuda")
    adapters = os.path.join(checkpoint, "adapters")
    names = [f"r16_{i}" for i in range(num_adapters)]
    model = PeftModel.from_pretrained(base, os.path.join(adapters, names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.path.join(adapters, name), adapter_name=name)
    model.eval()
    return model, names


def generate_seconds(model, batch, prompt, new, adapter_names, repeat):
    gen = torch.Generator(device="cuda").manual_seed(batch)
    ids = torch.randint(0, 128000, (batch, prompt), device="cuda", generator=gen)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names

    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt + new, out.shape
        return time.perf_counter() - t0

    run()  # warm-up
    return statistics.median(run() for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out_json")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--adapters", type=int, default=32, help="adapters loaded (PEFT takes ~1 s each)")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    model, names = load(args.checkpoint, min(args.adapters, max(batches)))
    print(f"loaded model + {len(names)} adapters in {time.time() - t0:.1f} s", flush=True)

    results = []
    for batch in batches:
        scenarios = [("base", None), ("one adapter r16", [names[0]] * batch)]
        if batch > 1:  # at batch 1 "distinct" is the one-adapter case again
            scenarios.append((f"{min(batch, len(names))} distinct r16",
                              [names[i % len(names)] for i in range(batch)]))
        for scenario, adapter_names in scenarios:
            def timed(new):
                if scenario == "base":
                    with model.disable_adapter():
                        return generate_seconds(model, batch, args.prompt, new, None, args.repeat)
                return generate_seconds(model, batch, args.prompt, new, adapter_names, args.repeat)
            sec = timed(args.new)
            first = timed(1)  # prefill + the first token
            tok_s = batch * args.new / sec
            decode_tok_s = batch * (args.new - 1) / max(sec - first, 1e-9)
            results.append({"engine": "transformers+peft", "scenario": scenario, "batch": batch,
                            "prompt": args.prompt, "new_tokens": args.new, "seconds": sec,
                            "first_token_seconds": first, "tokens_per_s": tok_s,
                            "decode_tokens_per_s": decode_tok_s})
            print(f"hf+peft {scenario:<22} batch {batch:4d}: {sec:7.3f} s  {tok_s:9.1f} tok/s"
                  f"  (decode alone {decode_tok_s:9.1f} tok/s)", flush=True)
    with open(args.out_json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
