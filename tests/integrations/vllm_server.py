"""vLLM's CPU server from ``.venv-vllm`` (optionally with kvmem's connector) on 127.0.0.1, for the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from kvmem.bench.load import RequestTiming, one_request
from kvmem.bench.servers import vllm_serve
from kvmem.integrations.vllm.settings import VLLM_OPTIONS, transfer_config
from kvmem.model.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_READY = ROOT / ".venv-vllm" / ".kvmem-installed"  # `make vllm-venv`: vLLM with kvmem installed
BLOCK = 128  # vLLM's block size on CPU


# vLLM's block hashes of whole blocks, as vLLM computes them with the hash the connector requires
BLOCK_HASHES = """
import json, sys
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
tokens, block = json.load(sys.stdin)
fn = get_hash_fn_by_name("sha256_cbor")
kv_cache_utils.init_none_hash(fn)
parent, found = None, []
for start in range(0, len(tokens) - block + 1, block):
    parent = kv_cache_utils.hash_block_tokens(fn, parent, tokens[start : start + block], None)
    found.append(bytes(parent).hex())
print(json.dumps(found))
"""


def block_hashes(tokens: list[int]) -> list[str]:
    """The hex hash of each whole block of ``tokens``, computed by vLLM in a fresh interpreter."""
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", BLOCK_HASHES],
        input=json.dumps([tokens, BLOCK]),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


class VLLMServer:
    """``redis_url``: kvmem's connector on that Redis (None: plain vLLM)."""

    def __init__(
        self,
        folder: Path,
        spec: ModelSpec,
        port: int,
        log: Path,
        redis_url: str | None,
        dtype: str,
        prefix_cache: bool = True,
        **extra: object,
    ) -> None:
        """``prefix_cache``: vLLM's own prefix cache (off: only the connector can skip computing a prefix)."""
        self.port = port
        options = (
            [*VLLM_OPTIONS, "--kv-transfer-config", transfer_config(redis_url, **extra)] if redis_url else []
        )
        if not prefix_cache:
            options.append("--no-enable-prefix-caching")
        command = vllm_serve(VLLM_PYTHON, folder, "m", spec, port, 2**30, dtype, 4, extra=options)
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            command.argv, stdout=self._log, stderr=subprocess.STDOUT, env=command.env, start_new_session=True
        )

    def wait_ready(self, seconds: float = 300) -> VLLMServer:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM did not start in {seconds} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def complete(self, prompt: list[int], max_tokens: int, **extra: object) -> RequestTiming:
        return one_request("127.0.0.1", self.port, "m", prompt, max_tokens, 300, **extra)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
