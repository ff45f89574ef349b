#!/usr/bin/env python3
"""gRPC load generator for a running loraplexd: keeps N streams in flight (each on its own adapter,
round robin over the given adapters; "" = base model), greedy with ignore_eos so every request
produces exactly --new-tokens tokens, and reports generated tokens/s, median and p99 time to first
token and inter-token latency. Prints one JSON line last.

  python3 bench/loadgen.py --server 127.0.0.1:50051 --concurrency 8 --requests 32 \
      --adapters reverse,upper,shift,sort --prompt "copy: stressed =>" --new-tokens 64
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from client import find_stubs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--adapters", default="", help="comma-separated; empty entry = base model")
    p.add_argument("--prompt", default="copy: stressed =>")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--stubs")
    p.add_argument("--wait-ready", type=float, default=30,
                   help="seconds to wait for the server to accept connections (it listens once loaded)")
    args = p.parse_args()
    sys.path.insert(0, find_stubs(args.stubs))
    import grpc
    from loraplex.v1 import generation_pb2, generation_pb2_grpc

    channel = grpc.insecure_channel(args.server)
    grpc.channel_ready_future(channel).result(timeout=args.wait_ready)
    stub = generation_pb2_grpc.GenerationStub(channel)
    adapters = args.adapters.split(",")
    lock = threading.Lock()
    next_id = [0]
    ttft, itl, tokens = [], [], [0]
    errors = []

    def worker():
        while True:
            with lock:
                if next_id[0] >= args.requests:
                    return
                i = next_id[0]
                next_id[0] += 1
            req = generation_pb2.GenerateRequest(
                adapter=adapters[i % len(adapters)], text=args.prompt,
                sampling=generation_pb2.SamplingParams(max_new_tokens=args.new_tokens,
                                                       temperature=0.0, ignore_eos=True))
            start = time.monotonic()
            last = None
            n = 0
            try:
                for r in stub.Generate(req, timeout=600):
                    if r.WhichOneof("response") != "chunk" or not r.chunk.token_ids:
                        continue
                    now = time.monotonic()
                    with lock:
                        if last is None:
                            ttft.append(now - start)
                        else:
                            itl.append((now - last) / len(r.chunk.token_ids))
                    last = now
                    n += len(r.chunk.token_ids)
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
            with lock:
                tokens[0] += n

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0

    def pct(xs, q):
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    result = {
        "concurrency": args.concurrency, "requests": args.requests, "adapters": adapters,
        "new_tokens": args.new_tokens, "generated_tokens": tokens[0], "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens[0] / wall, 2),
        "ttft_median_s": round(statistics.median(ttft), 4) if ttft else None,
        "ttft_p99_s": round(pct(ttft, 0.99), 4) if ttft else None,
        "itl_median_s": round(statistics.median(itl), 5) if itl else None,
        "errors": errors[:5], "num_errors": len(errors),
    }
    print(json.dumps(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
