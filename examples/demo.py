#!/usr/bin/env python3
"""The loraplex demo client: sends ONE batch of concurrent requests that mixes every adapter of the
trained demo model (and the base model), then prints what each adapter did with each word, e.g.
`reverse: stressed -> desserts`, and whether it is the right answer for the adapter's task.

  python3 examples/demo.py [--server 127.0.0.1:50051] [--wait-ready SECONDS] [--words a,b,c]

Needs python3-grpcio and the stubs generated into build/python (see examples/client.py).
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import find_stubs  # noqa: E402

TASKS = {
    "copy": lambda w: w,  # the base model's own skill
    "reverse": lambda w: w[::-1],
    "upper": lambda w: w.upper(),
    "sort": lambda w: "".join(sorted(w)),
    "shift": lambda w: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w),
}
WORDS = ["stressed", "lora", "plex", "zebra", "gpu", "kernel"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--wait-ready", type=float, default=10.0,
                        help="seconds to wait for the server to answer")
    parser.add_argument("--words", default=",".join(WORDS))
    parser.add_argument("--stubs", help="directory holding loraplex/v1/*_pb2.py")
    args = parser.parse_args()

    sys.path.insert(0, find_stubs(args.stubs))
    import grpc
    from loraplex.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

    channel = grpc.insecure_channel(args.server)
    try:
        grpc.channel_ready_future(channel).result(timeout=args.wait_ready)
    except grpc.FutureTimeoutError:
        sys.exit(f"demo.py: no server at {args.server}")
    admin = admin_pb2_grpc.AdminStub(channel)
    generation = generation_pb2_grpc.GenerationStub(channel)
    info = admin.GetModelInfo(admin_pb2.GetModelInfoRequest())
    registered = {a.name for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest()).adapters}

    words = [w for w in args.words.split(",") if w]
    jobs = []  # (task, adapter, word)
    for task in TASKS:
        adapter = "" if task == "copy" else task
        if adapter and adapter not in registered:
            continue
        jobs += [(task, adapter, w) for w in words]

    results = {}
    lock = threading.Lock()

    def ask(job):
        task, adapter, word = job
        request = generation_pb2.GenerateRequest(
            adapter=adapter, text=f"{task}: {word} =>",
            sampling=generation_pb2.SamplingParams(max_new_tokens=24, temperature=0.0))
        text = []
        try:
            for response in generation.Generate(request, timeout=120):
                if response.WhichOneof("response") == "chunk":
                    text.append(response.chunk.text)
            answer = "".join(text).strip()
        except grpc.RpcError as e:
            answer = f"<error {e.code().name}: {e.details()}>"
        with lock:
            results[job] = answer

    start = time.monotonic()
    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start

    print(f"{len(jobs)} requests in one mixed batch ({len(TASKS) - 1} adapters + the base model) "
          f"on the {info.executor} executor: {elapsed:.2f} s\n")
    right = {}
    for task, adapter, word in jobs:
        answer = results[(task, adapter, word)]
        ok = answer == TASKS[task](word)
        right.setdefault(task, []).append(ok)
        who = adapter or "base"
        print(f"  {who:>7}  {task}: {word} -> {answer}  {'ok' if ok else 'WRONG (expected ' + TASKS[task](word) + ')'}")
    print()
    for task, oks in right.items():
        print(f"  {task:>7}: {sum(oks)}/{len(oks)} right")
    return 0 if all(all(v) for v in right.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
