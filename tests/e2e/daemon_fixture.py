"""Starts the real loraplexd on the demo model for the end-to-end tests.

Environment: LORAPLEX_SOURCE_DIR (the repository) and LORAPLEX_BINARY_DIR (the build directory
holding server/loraplexd, python/ and tests/e2e/python/); CTest sets both.
"""

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SOURCE_DIR = os.environ.get("LORAPLEX_SOURCE_DIR",
                            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BINARY_DIR = os.environ.get("LORAPLEX_BINARY_DIR", os.path.join(SOURCE_DIR, "build"))
sys.path.insert(0, os.path.join(BINARY_DIR, "python"))
sys.path.insert(0, os.path.join(BINARY_DIR, "tests", "e2e", "python"))

import grpc  # noqa: E402

import e2e_health_pb2  # noqa: E402
import e2e_health_pb2_grpc  # noqa: E402
from loraplex.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402,F401
from loraplex.v1 import generation_pb2, generation_pb2_grpc  # noqa: E402,F401

LORAPLEXD = os.path.join(BINARY_DIR, "server", "loraplexd")
DEMO_ADAPTERS = ("upper", "reverse", "shift", "sorter")
START_TIMEOUT_S = 120


def make_demo(out_dir):
    """Runs scripts/make_demo_model.py into out_dir; returns out_dir."""
    subprocess.run([sys.executable, os.path.join(SOURCE_DIR, "scripts", "make_demo_model.py"), out_dir],
                   check=True, stdout=subprocess.DEVNULL)
    return out_dir


def write_config(path, demo_dir, adapters, extra="", lora_extra=()):
    """Writes a daemon config for the demo model; adapters is a list of (name, path); lora_extra:
    more lines of the lora section (indented)."""
    lines = [
        "server:",
        "  address: 127.0.0.1:0",
        "  max_new_tokens_limit: 1024",
        "model:",
        f"  path: {os.path.join(demo_dir, 'model')}",
        "  dtype: float32",
        "engine:",
        "  executor: cpu",
        "lora:",
        "  adapter_slots: 4",
        *lora_extra,
        "adapters:",
    ]
    for name, adapter_path in adapters:
        lines += [f"  - name: {name}", f"    path: {adapter_path}"]
    lines += ["logging:", "  level: info"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    return path


@dataclasses.dataclass
class Daemon:
    """A running loraplexd; its log goes to log_path."""
    process: subprocess.Popen
    log_path: str
    port: int
    channel: grpc.Channel

    @staticmethod
    def start(config_path, log_path):
        log = open(log_path, "w")
        process = subprocess.Popen([LORAPLEXD, "--config", config_path], stdout=log,
                                   stderr=subprocess.STDOUT)
        log.close()
        port = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while port is None:
            with open(log_path) as f:
                match = re.search(r"listening on 127\.0\.0\.1:(\d+)", f.read())
            if match:
                port = int(match.group(1))
            elif process.poll() is not None:
                raise RuntimeError(f"loraplexd exited with {process.returncode}:\n{Daemon._tail(log_path)}")
            elif time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"loraplexd did not start in time:\n{Daemon._tail(log_path)}")
            else:
                time.sleep(0.05)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        daemon = Daemon(process, log_path, port, channel)
        daemon.wait_serving()
        return daemon

    @staticmethod
    def _tail(log_path, lines=40):
        with open(log_path) as f:
            return "".join(f.readlines()[-lines:])

    def log_tail(self):
        return self._tail(self.log_path)

    def health(self, service=""):
        stub = e2e_health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(e2e_health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == e2e_health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"loraplexd never reported SERVING:\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self):
        return self.process.poll() is None

    def stop(self, timeout_s=60):
        """SIGTERM (drain) and wait; returns the exit code (killed and None after the timeout)."""
        self.channel.close()
        if not self.alive():
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def make_temp_dir():
    return tempfile.mkdtemp(prefix="loraplex-e2e-", dir=tempfile.gettempdir())


def remove_temp_dir(path):
    shutil.rmtree(path, ignore_errors=True)
