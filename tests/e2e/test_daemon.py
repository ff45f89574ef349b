"""End-to-end tests: the real loraplexd on the demo model, driven over gRPC on loopback.

One daemon serves every test in this module (started in setUpModule); each test checks that it
is still alive afterwards, and tearDownModule stops it with SIGTERM and expects a clean exit.
"""

import concurrent.futures
import dataclasses
import os
import subprocess
import threading
import time
import unittest

import daemon_fixture as fx
from daemon_fixture import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

import e2e_reflection_pb2
import e2e_reflection_pb2_grpc
import grpc

DAEMON = None
TEMP_DIR = None
DEMO_DIR = None
CONFIG_PATH = None

PROMPTS = ["hello world", "The quick brown fox", "abc 123", "LoRA adapters share a batch",
           "tiny model, big dreams", "zzz", "Once upon a time", "x"]


def setUpModule():
    global DAEMON, TEMP_DIR, DEMO_DIR, CONFIG_PATH
    TEMP_DIR = fx.make_temp_dir()
    DEMO_DIR = fx.make_demo(os.path.join(TEMP_DIR, "demo"))
    adapters = [(name, os.path.join(DEMO_DIR, "adapters", name)) for name in fx.DEMO_ADAPTERS]
    # A broken registry entry: the daemon must log it and serve the others.
    adapters.append(("broken", os.path.join(TEMP_DIR, "no-such-adapter")))
    CONFIG_PATH = fx.write_config(os.path.join(TEMP_DIR, "loraplexd.yaml"), DEMO_DIR, adapters)
    DAEMON = fx.Daemon.start(CONFIG_PATH, os.path.join(TEMP_DIR, "loraplexd.log"))


def tearDownModule():
    if DAEMON is not None:
        alive = DAEMON.alive()
        code = DAEMON.stop()
        if not alive or code != 0:
            raise AssertionError(f"loraplexd alive={alive} exit={code}:\n{DAEMON.log_tail()}")
    if TEMP_DIR is not None:
        fx.remove_temp_dir(TEMP_DIR)


@dataclasses.dataclass
class Result:
    started: object = None
    token_ids: list = dataclasses.field(default_factory=list)
    text: str = ""
    deltas: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    complete: object = None


def greedy_request(prompt, adapter="", max_new_tokens=12, **sampling):
    return generation_pb2.GenerateRequest(
        adapter=adapter, text=prompt,
        sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                               ignore_eos=True, **sampling))


def generation_stub():
    return generation_pb2_grpc.GenerationStub(DAEMON.channel)


def admin_stub():
    return admin_pb2_grpc.AdminStub(DAEMON.channel)


def run(request, timeout=60):
    """Runs one Generate call to completion and checks the stream's shape."""
    result = Result()
    for i, response in enumerate(generation_stub().Generate(request, timeout=timeout)):
        kind = response.WhichOneof("response")
        if i == 0:
            assert kind == "started", f"first message is {kind}"
            result.started = response.started
        elif kind == "chunk":
            assert result.complete is None, "chunk after complete"
            result.token_ids += response.chunk.token_ids
            result.text += response.chunk.text
            result.deltas.append(response.chunk.text)
            result.logprobs += response.chunk.logprobs
        elif kind == "complete":
            assert result.complete is None, "two completes"
            result.complete = response.complete
        else:
            raise AssertionError(f"unexpected message {kind} at {i}")
    assert result.complete is not None, "stream ended without complete"
    return result


def wait_for(predicate, timeout_s=5.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class DaemonTest(unittest.TestCase):
    def tearDown(self):
        self.assertTrue(DAEMON.alive(), f"loraplexd died:\n{DAEMON.log_tail()}")

    def assertRpcError(self, code, call, *fields):
        with self.assertRaises(grpc.RpcError) as ctx:
            result = call()
            if hasattr(result, "__iter__"):
                list(result)
        self.assertEqual(ctx.exception.code(), code, ctx.exception.details())
        for field in fields:
            self.assertIn(field, ctx.exception.details())
        return ctx.exception


class HealthAndInfoTest(DaemonTest):
    def test_health_reports_serving_for_the_server_and_its_services(self):
        for service in ("", "loraplex.v1.Generation", "loraplex.v1.Admin"):
            self.assertEqual(DAEMON.health(service), fx.e2e_health_pb2.HealthCheckResponse.SERVING)

    def test_reflection_lists_the_services(self):
        stub = e2e_reflection_pb2_grpc.ServerReflectionStub(DAEMON.channel)
        responses = stub.ServerReflectionInfo(
            iter([e2e_reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
        self.assertLessEqual({"loraplex.v1.Generation", "loraplex.v1.Admin", "grpc.health.v1.Health"},
                             names)

    def test_model_info_describes_the_demo_model(self):
        info = admin_stub().GetModelInfo(admin_pb2.GetModelInfoRequest(), timeout=10)
        self.assertEqual(info.architecture, "LlamaForCausalLM")
        self.assertEqual((info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads),
                         (64, 2, 4, 2))
        self.assertEqual(info.executor, "cpu")
        self.assertEqual(info.dtype, "float32")
        self.assertGreater(info.vocab_size, 0)
        self.assertGreater(info.max_seq_len, 0)

    def test_server_info_reports_version_and_health(self):
        info = admin_stub().GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=10)
        self.assertTrue(info.healthy)
        self.assertTrue(info.version)
        self.assertEqual(info.adapter_slots_total, 4)
        self.assertGreater(info.kv_blocks_total, 0)

    def test_a_broken_registry_entry_is_skipped_and_the_rest_are_served(self):
        names = [a.name for a in admin_stub().ListAdapters(admin_pb2.ListAdaptersRequest()).adapters]
        self.assertEqual(names, sorted(fx.DEMO_ADAPTERS))

    def test_check_config_reports_the_broken_adapter_and_fails(self):
        proc = subprocess.run([fx.LORAPLEXD, "--config", CONFIG_PATH, "--check-config"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("broken", proc.stderr)

    def test_a_second_daemon_on_the_same_port_exits_with_a_clear_error(self):
        config = fx.write_config(os.path.join(TEMP_DIR, "same-port.yaml"), DEMO_DIR, [])
        with open(config) as f:
            text = f.read().replace("127.0.0.1:0", f"127.0.0.1:{DAEMON.port}")
        with open(config, "w") as f:
            f.write(text)
        proc = subprocess.run([fx.LORAPLEXD, "--config", config], capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(f"cannot listen on '127.0.0.1:{DAEMON.port}'", proc.stdout + proc.stderr)

    def test_bad_command_lines_exit_non_zero_with_the_reason(self):
        cases = [([], "--config is required"),
                 (["--config", os.path.join(TEMP_DIR, "missing.yaml")], "missing.yaml"),
                 (["--config", CONFIG_PATH, "--log-level", "loud"], "loud"),
                 (["--config", CONFIG_PATH, "--bogus"], "--bogus")]
        for args, reason in cases:
            with self.subTest(args=args):
                proc = subprocess.run([fx.LORAPLEXD] + args, capture_output=True, text=True, timeout=60)
                self.assertNotEqual(proc.returncode, 0)
                self.assertIn(reason, proc.stderr)

    def test_check_config_accepts_a_good_config(self):
        adapters = [(n, os.path.join(DEMO_DIR, "adapters", n)) for n in fx.DEMO_ADAPTERS]
        good = fx.write_config(os.path.join(TEMP_DIR, "good.yaml"), DEMO_DIR, adapters)
        proc = subprocess.run([fx.LORAPLEXD, "--config", good, "--check-config"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)


class HostCacheTest(unittest.TestCase):
    """lora.host_cache_mib: idle adapters' weights leave host memory and come back on use."""

    def test_a_dropped_adapter_is_parsed_again_when_a_request_uses_it(self):
        upper = os.path.join(DEMO_DIR, "adapters", "upper")
        log_path = os.path.join(TEMP_DIR, "host-cache.log")
        config = fx.write_config(os.path.join(TEMP_DIR, "host-cache.yaml"), DEMO_DIR, [("upper", upper)],
                                 lora_extra=["  host_cache_mib: 1"])
        daemon = fx.Daemon.start(config, log_path)
        try:
            admin = admin_pb2_grpc.AdminStub(daemon.channel)
            generation = generation_pb2_grpc.GenerationStub(daemon.channel)

            def tokens(adapter):
                return [t for r in generation.Generate(greedy_request(PROMPTS[0], adapter), timeout=60)
                        if r.WhichOneof("response") == "chunk" for t in r.chunk.token_ids]

            def states():
                return {a.name: a.state for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest()).adapters}

            expected = tokens("upper")
            size = admin.ListAdapters(admin_pb2.ListAdaptersRequest()).adapters[0].weight_bytes
            # More copies than 1 MiB holds: the least recently used ones leave host memory.
            copies = (1 << 20) // size + 2
            for i in range(copies):
                admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name=f"upper-{i}", path=upper))
            now = states()
            self.assertEqual(len(now), copies + 1)
            self.assertEqual(now["upper"], admin_pb2.ADAPTER_STATE_ON_DISK)
            self.assertGreaterEqual(sum(s == admin_pb2.ADAPTER_STATE_ON_DISK for s in now.values()), 2)
            self.assertNotEqual(now[f"upper-{copies - 1}"], admin_pb2.ADAPTER_STATE_ON_DISK)
            # Parsed again from its path: the same weights give the same tokens.
            self.assertEqual(tokens("upper"), expected)
            self.assertNotEqual(states()["upper"], admin_pb2.ADAPTER_STATE_ON_DISK)
            with open(log_path) as f:
                self.assertIn("adapter 'upper' reloaded into host memory", f.read())
        finally:
            alive = daemon.alive()
            code = daemon.stop()
            self.assertTrue(alive and code == 0, f"loraplexd alive={alive} exit={code}:\n{daemon.log_tail()}")


class GenerateTest(DaemonTest):
    def test_concurrent_streams_match_each_request_served_alone(self):
        adapters = [""] + list(fx.DEMO_ADAPTERS)
        requests = [greedy_request(PROMPTS[i % len(PROMPTS)], adapters[i % len(adapters)],
                                   max_new_tokens=8 + i % 5) for i in range(16)]
        solo = [run(r).token_ids for r in requests]
        barrier = threading.Barrier(len(requests))

        def together(request):
            barrier.wait()
            return run(request).token_ids

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            concurrent_ids = list(pool.map(together, requests))
        for i, request in enumerate(requests):
            self.assertEqual(concurrent_ids[i], solo[i], f"request {i} adapter '{request.adapter}'")
            self.assertEqual(len(solo[i]), request.sampling.max_new_tokens)

    def test_adapters_change_the_greedy_output(self):
        base = run(greedy_request(PROMPTS[0])).token_ids
        for name in fx.DEMO_ADAPTERS:
            self.assertNotEqual(run(greedy_request(PROMPTS[0], name)).token_ids, base, name)

    def test_unknown_adapter_is_not_found(self):
        self.assertRpcError(grpc.StatusCode.NOT_FOUND,
                            lambda: run(greedy_request("hi", "no-such-adapter")), "no-such-adapter")

    def test_each_bad_field_is_invalid_argument_naming_the_field(self):
        S = generation_pb2.SamplingParams
        O = generation_pb2.OutputOptions
        R = generation_pb2.GenerateRequest
        cases = [
            (R(), "prompt"),
            (R(text=""), "prompt"),
            (R(token_ids=generation_pb2.TokenIds(ids=[])), "prompt"),
            (R(token_ids=generation_pb2.TokenIds(ids=[1, 10_000_000])), "prompt.token_ids[1]"),
            (R(text="hi", request_id="r" * 129), "request_id"),
            (R(text="hi", sampling=S(max_new_tokens=1025)), "sampling.max_new_tokens"),
            (R(text="hi", sampling=S(temperature=-1.0)), "sampling.temperature"),
            (R(text="hi", sampling=S(top_p=1.5)), "sampling.top_p must be in (0, 1], got 1.5"),
            (R(text="hi", sampling=S(top_p=0.0)), "sampling.top_p"),
            (R(text="hi", sampling=S(stop=["s"] * 17)), "sampling.stop"),
            (R(text="hi", sampling=S(stop=["x" * 257])), "sampling.stop[0]"),
            (R(text="hi", sampling=S(stop_token_ids=[10_000_000])), "sampling.stop_token_ids[0]"),
            (R(text="hi", output=O(logprobs=True, top_logprobs=21)), "output.top_logprobs"),
            (R(text="hi", output=O(top_logprobs=2)), "output.top_logprobs"),
            (R(text="hi " * 600), "context"),
        ]
        for request, field in cases:
            with self.subTest(field=field):
                self.assertRpcError(grpc.StatusCode.INVALID_ARGUMENT, lambda: run(request), field)

    def test_max_new_tokens_finishes_with_length_and_usage(self):
        prompt_ids = generation_stub().Tokenize(generation_pb2.TokenizeRequest(text=PROMPTS[1])).token_ids
        result = run(greedy_request(PROMPTS[1], "upper", max_new_tokens=5))
        self.assertEqual(result.complete.finish_reason, generation_pb2.FINISH_REASON_LENGTH)
        self.assertEqual(len(result.token_ids), 5)
        self.assertEqual(result.complete.usage.completion_tokens, 5)
        self.assertEqual(result.complete.usage.prompt_tokens, len(prompt_ids))
        self.assertEqual(result.started.prompt_tokens, len(prompt_ids))
        self.assertGreaterEqual(result.complete.usage.total_time_s,
                                result.complete.usage.time_to_first_token_s)

    def test_started_echoes_the_request_id_and_adapter(self):
        request = greedy_request("hi", "shift", max_new_tokens=2)
        request.request_id = "client-42"
        result = run(request)
        self.assertEqual(result.started.request_id, "client-42")
        self.assertEqual(result.started.adapter, "shift")
        self.assertGreater(result.started.engine_request_id, 0)

    def test_text_deltas_concatenate_to_the_detokenized_ids(self):
        for adapter in ("", "reverse"):
            result = run(greedy_request(PROMPTS[2], adapter, max_new_tokens=30))
            decoded = generation_stub().Detokenize(
                generation_pb2.DetokenizeRequest(token_ids=result.token_ids)).text
            self.assertEqual(result.text, decoded)

    def test_token_id_prompt_gives_the_same_tokens_as_its_text(self):
        ids = generation_stub().Tokenize(generation_pb2.TokenizeRequest(text=PROMPTS[3])).token_ids
        by_text = run(greedy_request(PROMPTS[3], "sorter"))
        by_ids = run(generation_pb2.GenerateRequest(
            adapter="sorter", token_ids=generation_pb2.TokenIds(ids=ids),
            sampling=generation_pb2.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)))
        self.assertEqual(by_ids.token_ids, by_text.token_ids)

    def test_logprobs_and_top_logprobs_come_when_asked(self):
        request = greedy_request(PROMPTS[4], "upper", max_new_tokens=6)
        plain = run(request)
        self.assertEqual(plain.logprobs, [])
        request.output.logprobs = True
        request.output.top_logprobs = 3
        result = run(request)
        self.assertEqual(result.token_ids, plain.token_ids)
        self.assertEqual([lp.token_id for lp in result.logprobs], result.token_ids)
        for lp in result.logprobs:
            self.assertLessEqual(lp.logprob, 0.0)
            self.assertEqual(len(lp.top), 3)
            # Greedy picks the most likely token, so it heads the alternatives.
            self.assertEqual(lp.top[0].token_id, lp.token_id)
            self.assertAlmostEqual(lp.top[0].logprob, lp.logprob, places=5)
            self.assertGreaterEqual(lp.top[0].logprob, lp.top[1].logprob)

    def test_seeded_sampling_is_reproducible(self):
        request = generation_pb2.GenerateRequest(
            text=PROMPTS[5], adapter="reverse",
            sampling=generation_pb2.SamplingParams(max_new_tokens=10, temperature=1.0, seed=1234,
                                                   ignore_eos=True))
        self.assertEqual(run(request).token_ids, run(request).token_ids)

    def test_stop_string_cuts_the_text_and_finishes_with_stop(self):
        full = run(greedy_request(PROMPTS[6], "shift", max_new_tokens=40))
        text = full.text
        self.assertGreater(len(text), 8, "the demo model should produce some text")
        # A stop string from the middle of the completion, at its first occurrence.
        start = len(text) // 2
        stop = text[start:start + 3]
        start = text.find(stop)
        result = run(greedy_request(PROMPTS[6], "shift", max_new_tokens=40, stop=[stop, "\x01never"]))
        self.assertEqual(result.complete.finish_reason, generation_pb2.FINISH_REASON_STOP)
        self.assertEqual(result.complete.stop_reason, stop)
        self.assertEqual(result.text, text[:start])
        self.assertEqual(result.token_ids, full.token_ids[:len(result.token_ids)])
        self.assertLess(len(result.token_ids), len(full.token_ids))

    def test_stop_token_id_finishes_with_stop(self):
        full = run(greedy_request(PROMPTS[7], max_new_tokens=10))
        stop_id = full.token_ids[4]
        result = run(greedy_request(PROMPTS[7], max_new_tokens=10, stop_token_ids=[stop_id]))
        self.assertEqual(result.complete.finish_reason, generation_pb2.FINISH_REASON_STOP)
        self.assertEqual(result.token_ids[-1], stop_id)
        self.assertEqual(result.token_ids, full.token_ids[:len(result.token_ids)])

    def test_a_cancelled_stream_frees_its_sequence(self):
        before = admin_stub().GetServerInfo(admin_pb2.GetServerInfoRequest())
        call = generation_stub().Generate(greedy_request(PROMPTS[0], "sorter", max_new_tokens=400),
                                          timeout=60)
        saw_chunk = False
        for response in call:
            if response.WhichOneof("response") == "chunk":
                saw_chunk = True
                break
        self.assertTrue(saw_chunk)
        call.cancel()

        def freed():
            info = admin_stub().GetServerInfo(admin_pb2.GetServerInfoRequest())
            return (info.running_requests == 0 and info.waiting_requests == 0
                    and info.kv_blocks_used == 0 and info.open_streams == 0
                    and info.requests_cancelled > before.requests_cancelled)

        wait_for(freed, timeout_s=5, what="the cancelled request to free its sequence")

    def test_a_deadline_cancels_the_request(self):
        with self.assertRaises(grpc.RpcError) as ctx:
            # ~450 tokens take a few hundred ms on the CPU demo model: well past the deadline.
            list(generation_stub().Generate(greedy_request(PROMPTS[1], max_new_tokens=450),
                                            timeout=0.05))
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED, ctx.exception.details())
        wait_for(lambda: admin_stub().GetServerInfo(admin_pb2.GetServerInfoRequest()).running_requests == 0,
                 what="the expired request to stop")


class TokenizeTest(DaemonTest):
    def test_tokenize_and_detokenize_round_trip(self):
        stub = generation_stub()
        with_bos = stub.Tokenize(generation_pb2.TokenizeRequest(text="hello world")).token_ids
        without = stub.Tokenize(generation_pb2.TokenizeRequest(text="hello world",
                                                               add_special_tokens=False)).token_ids
        self.assertEqual(len(with_bos), len(without) + 1)
        self.assertEqual(list(with_bos[1:]), list(without))
        self.assertEqual(stub.Detokenize(generation_pb2.DetokenizeRequest(token_ids=with_bos)).text,
                         "hello world")

    def test_detokenize_refuses_ids_outside_the_vocabulary(self):
        self.assertRpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: generation_stub().Detokenize(generation_pb2.DetokenizeRequest(token_ids=[10_000_000])),
            "token_ids")


class AdminTest(DaemonTest):
    def test_load_use_and_unload_an_adapter(self):
        admin = admin_stub()
        path = os.path.join(DEMO_DIR, "adapters", "upper")
        loaded = admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name="upper-copy", path=path)).adapter
        self.assertEqual(loaded.name, "upper-copy")
        self.assertEqual(loaded.rank, 8)
        self.assertIn("q_proj", loaded.target_modules)
        self.assertIn("upper-copy", [a.name for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest()).adapters])
        self.assertRpcError(grpc.StatusCode.ALREADY_EXISTS,
                            lambda: admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name="upper-copy", path=path)))

        # The same weights under another name give the same tokens.
        self.assertEqual(run(greedy_request(PROMPTS[0], "upper-copy")).token_ids,
                         run(greedy_request(PROMPTS[0], "upper")).token_ids)

        states = {a.name: a.state for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest()).adapters}
        self.assertEqual(states["upper-copy"], admin_pb2.ADAPTER_STATE_RESIDENT)
        self.assertIn("upper-copy", admin.GetServerInfo(admin_pb2.GetServerInfoRequest()).resident_adapters)

        admin.UnloadAdapter(admin_pb2.UnloadAdapterRequest(name="upper-copy"))
        self.assertNotIn("upper-copy", [a.name for a in admin.ListAdapters(admin_pb2.ListAdaptersRequest()).adapters])
        wait_for(lambda: "upper-copy" not in admin.GetServerInfo(admin_pb2.GetServerInfoRequest()).resident_adapters,
                 what="the unloaded adapter to leave its device slot")
        self.assertRpcError(grpc.StatusCode.NOT_FOUND, lambda: run(greedy_request("hi", "upper-copy")))
        self.assertRpcError(grpc.StatusCode.NOT_FOUND,
                            lambda: admin.UnloadAdapter(admin_pb2.UnloadAdapterRequest(name="upper-copy")))

    def test_loading_a_bad_path_fails_and_changes_nothing(self):
        admin = admin_stub()
        before = admin.ListAdapters(admin_pb2.ListAdaptersRequest())
        self.assertRpcError(grpc.StatusCode.NOT_FOUND, lambda: admin.LoadAdapter(
            admin_pb2.LoadAdapterRequest(name="ghost", path=os.path.join(TEMP_DIR, "nothing-here"))))
        self.assertRpcError(grpc.StatusCode.INVALID_ARGUMENT,
                            lambda: admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name="", path="x")), "name")
        self.assertEqual(admin.ListAdapters(admin_pb2.ListAdaptersRequest()), before)

    def test_unloading_an_adapter_in_use_is_a_failed_precondition(self):
        admin = admin_stub()
        path = os.path.join(DEMO_DIR, "adapters", "reverse")
        admin.LoadAdapter(admin_pb2.LoadAdapterRequest(name="busy", path=path))
        call = generation_stub().Generate(greedy_request(PROMPTS[1], "busy", max_new_tokens=400),
                                          timeout=60)
        next(iter(call))  # Started: the engine holds the adapter
        self.assertRpcError(grpc.StatusCode.FAILED_PRECONDITION,
                            lambda: admin.UnloadAdapter(admin_pb2.UnloadAdapterRequest(name="busy")), "busy")
        call.cancel()

        def unloaded():
            try:
                admin.UnloadAdapter(admin_pb2.UnloadAdapterRequest(name="busy"))
                return True
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                return False

        wait_for(unloaded, what="the adapter to be released after the cancel")


if __name__ == "__main__":
    unittest.main()
