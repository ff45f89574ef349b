"""End-to-end: SIGTERM drains loraplexd — health turns NOT_SERVING at once, streams already
running finish normally, and the process exits 0."""

import os
import signal
import threading
import time
import unittest

import daemon_fixture as fx
from daemon_fixture import e2e_health_pb2, generation_pb2, generation_pb2_grpc

STREAMS = 8


class DrainTest(unittest.TestCase):
    def setUp(self):
        self.temp_dir = fx.make_temp_dir()
        demo = fx.make_demo(os.path.join(self.temp_dir, "demo"))
        config = fx.write_config(os.path.join(self.temp_dir, "loraplexd.yaml"), demo,
                                 [("upper", os.path.join(demo, "adapters", "upper"))])
        self.daemon = fx.Daemon.start(config, os.path.join(self.temp_dir, "loraplexd.log"))

    def tearDown(self):
        if self.daemon.alive():
            self.daemon.stop()
        fx.remove_temp_dir(self.temp_dir)

    def test_sigterm_turns_health_off_and_lets_running_streams_finish(self):
        stub = generation_pb2_grpc.GenerationStub(self.daemon.channel)
        results = [None] * STREAMS
        first_chunks = threading.Semaphore(0)

        def stream(i):
            request = generation_pb2.GenerateRequest(
                text=f"stream {i}", adapter="upper" if i % 2 else "",
                sampling=generation_pb2.SamplingParams(max_new_tokens=480, temperature=0.0,
                                                       ignore_eos=True))
            tokens, complete, signalled = 0, None, False
            for response in stub.Generate(request, timeout=120):
                if response.WhichOneof("response") == "chunk":
                    tokens += len(response.chunk.token_ids)
                    if not signalled:
                        first_chunks.release()
                        signalled = True
                elif response.WhichOneof("response") == "complete":
                    complete = response.complete
            results[i] = (tokens, complete)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for _ in range(STREAMS):
            self.assertTrue(first_chunks.acquire(timeout=60))
        self.daemon.process.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 2
        status = None
        while time.monotonic() < deadline:
            status = self.daemon.health()
            if status == e2e_health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        self.assertEqual(status, e2e_health_pb2.HealthCheckResponse.NOT_SERVING)

        for t in threads:
            t.join(timeout=120)
        for i, (tokens, complete) in enumerate(results):
            self.assertIsNotNone(complete, f"stream {i}")
            self.assertEqual(complete.finish_reason, generation_pb2.FINISH_REASON_LENGTH, f"stream {i}")
            self.assertEqual(tokens, 480, f"stream {i}")
        self.assertEqual(self.daemon.process.wait(timeout=60), 0, self.daemon.log_tail())
        self.assertIn("draining", self.daemon.log_tail())


if __name__ == "__main__":
    unittest.main()
