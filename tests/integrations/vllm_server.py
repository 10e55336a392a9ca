"""vLLM's CPU server from ``.venv-vllm`` with kvmem's connector, on 127.0.0.1, for the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_READY = ROOT / ".venv-vllm" / ".kvmem-installed"  # `make vllm-venv`: vLLM with kvmem installed
BLOCK = 128


def connector_config(redis_url: str, **extra: object) -> str:
    return json.dumps(
        {
            "kv_connector": "KVMemConnector",
            "kv_connector_module_path": "kvmem.integrations.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"redis_url": redis_url, **extra},
        }
    )


class VLLMServer:
    def __init__(self, folder: Path, port: int, log: Path, transfer: str | None, dtype: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
        argv += ["--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
        argv += ["--enforce-eager", "--max-model-len", "4096", "--block-size", str(BLOCK)]
        argv += ["--max-num-seqs", "4"]
        argv += ["--prefix-caching-hash-algo", "sha256_cbor", "--enable-prompt-tokens-details"]
        if transfer is not None:
            argv += ["--kv-transfer-config", transfer]
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "0",  # 2 cores: none reserved for the front end
            "HF_HUB_OFFLINE": "1",
        }
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def wait_ready(self, seconds: float = 300) -> VLLMServer:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health").status_code == 200:
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

    def complete(self, prompt: list[int], max_tokens: int, **extra: object) -> tuple[dict, float]:
        """The response body and its time to first token (streamed; seconds)."""
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}
        start, first, text, usage = time.perf_counter(), None, [], None
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("text") and first is None:
                        first = time.perf_counter()
                    text.append(choice.get("text", ""))
        return {"text": "".join(text), "usage": usage}, (first or time.perf_counter()) - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.client.close()
        self._log.close()

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
