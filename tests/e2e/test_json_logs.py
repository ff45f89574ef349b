"""With `logging.format: json` every line loraplexd writes is one valid JSON object, also when a
message carries quotes, backslashes and control characters from a client (the request id)."""

import json
import os
import unittest

from daemon_fixture import (Daemon, generation_pb2, generation_pb2_grpc, make_demo,
                            make_temp_dir, remove_temp_dir, write_config)


class JsonLogsTest(unittest.TestCase):
    def test_every_log_line_is_a_json_object_with_the_message_escaped(self):
        tmp = make_temp_dir()
        try:
            demo = make_demo(os.path.join(tmp, "demo"))
            config = write_config(os.path.join(tmp, "loraplexd.yaml"), demo,
                                  [("upper", os.path.join(demo, "adapters", "upper"))])
            with open(config) as f:
                text = f.read().replace("  level: info", "  level: info\n  format: json")
            with open(config, "w") as f:
                f.write(text)
            daemon = Daemon.start(config, os.path.join(tmp, "loraplexd.log"))
            request_id = 'say "hi" \\ tab\there'
            stub = generation_pb2_grpc.GenerationStub(daemon.channel)
            request = generation_pb2.GenerateRequest(
                request_id=request_id, adapter="upper", text="hello",
                sampling=generation_pb2.SamplingParams(max_new_tokens=3, temperature=0))
            list(stub.Generate(request, timeout=60))
            self.assertEqual(daemon.stop(), 0)
            with open(daemon.log_path) as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
            self.assertGreater(len(lines), 3)
            messages = []
            for line in lines:
                record = json.loads(line)  # raises on any invalid line
                self.assertEqual(set(record), {"time", "level", "thread", "msg"})
                messages.append(record["msg"])
            self.assertTrue(any(request_id in m for m in messages),
                            "the finished-request line keeps the request id verbatim")
        finally:
            remove_temp_dir(tmp)


if __name__ == "__main__":
    unittest.main()
