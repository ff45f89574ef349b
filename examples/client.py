#!/usr/bin/env python3
"""A small loraplex client: sends one prompt to several adapters at once (one mixed batch on the
server) and prints what each adapter answered; with a single --adapter it streams the text.

  python3 examples/client.py [--server 127.0.0.1:50051] [--adapter upper --adapter base ...]
                             [--prompt "hello world"] [--max-new-tokens 24] [--temperature 0]

Without --adapter it asks the server (Admin.ListAdapters) and uses every adapter plus the base
model. "base" (or "") selects the base model. Needs python3-grpcio and the stubs generated into
<build>/python (found through --stubs, $LORAPLEX_PYTHON or build*/python next to this repo).
"""

import argparse
import glob
import os
import sys
import threading
import time


def find_stubs(explicit):
    candidates = [explicit, os.environ.get("LORAPLEX_PYTHON")]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates += sorted(glob.glob(os.path.join(repo, "build*", "python")))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "loraplex", "v1", "generation_pb2.py")):
            return path
    sys.exit("client.py: cannot find the Python stubs; build the loraplex_proto_python target and "
             "pass --stubs BUILD/python")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--adapter", action="append", default=[],
                        help="adapter name, repeatable; 'base' for the base model")
    parser.add_argument("--prompt", default="hello world")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stubs", help="directory holding loraplex/v1/*_pb2.py")
    args = parser.parse_args()

    sys.path.insert(0, find_stubs(args.stubs))
    import grpc
    from loraplex.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

    channel = grpc.insecure_channel(args.server)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        sys.exit(f"client.py: no server at {args.server}")
    generation = generation_pb2_grpc.GenerationStub(channel)

    adapters = ["" if a == "base" else a for a in args.adapter]
    if not adapters:
        listed = admin_pb2_grpc.AdminStub(channel).ListAdapters(admin_pb2.ListAdaptersRequest())
        adapters = [""] + [a.name for a in listed.adapters]

    lock = threading.Lock()
    answers = {}
    # One request streams its text as it comes; a batch prints one answer per adapter at the end.
    stream_inline = len(adapters) == 1

    def ask(adapter):
        label = adapter or "base"
        request = generation_pb2.GenerateRequest(
            request_id=f"client-{label}", adapter=adapter, text=args.prompt,
            sampling=generation_pb2.SamplingParams(max_new_tokens=args.max_new_tokens,
                                                   temperature=args.temperature))
        text, tokens, reason = [], 0, "?"
        try:
            for response in generation.Generate(request, timeout=120):
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    text.append(response.chunk.text)
                    tokens += len(response.chunk.token_ids)
                    if stream_inline:
                        sys.stdout.write(response.chunk.text)
                        sys.stdout.flush()
                elif kind == "complete":
                    reason = generation_pb2.FinishReason.Name(response.complete.finish_reason)
        except grpc.RpcError as e:
            reason = f"error {e.code().name}: {e.details()}"
        with lock:
            answers[label] = ("".join(text), tokens, reason)

    start = time.monotonic()
    threads = [threading.Thread(target=ask, args=(a,)) for a in adapters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    if stream_inline:
        print()

    print(f"\nprompt: {args.prompt!r}  ({len(adapters)} requests in one batch, {elapsed:.2f} s)")
    for adapter in adapters:
        label = adapter or "base"
        text, tokens, reason = answers[label]
        print(f"  {label:>10}: {text!r}  [{tokens} tokens, {reason}]")
    return 0 if all(not r[2].startswith("error") for r in answers.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
