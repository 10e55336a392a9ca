"""Starting the servers a serving benchmark compares: ``kvmem serve`` and vLLM's CPU server.

Both listen on 127.0.0.1 only, speak the same OpenAI completions API and get the same KV bytes:
kvmem a ``--kv-budget``, vLLM as many blocks of ``block_size`` tokens as those bytes hold in its
dtype (``--num-gpu-blocks-override``: ``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB only). vLLM runs
from its own venv (``make bench-vllm``: it pins an older transformers), eager, its prefix cache on
(its default). Each server is started in a session of its own and stopped with SIGTERM to it all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmem.bench.load import wait_ready
from kvmem.model.spec import ModelSpec

VLLM_BLOCK = 128  # vLLM's CPU default block size in tokens


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]
    kv_bytes: int  # what the server may hold for KV


def kvmem_serve(
    model: str, port: int, budget: int, policy: str | None, dtype: str, max_num_seqs: int, prefix_cache: bool
) -> ServerCommand:
    argv = [
        sys.executable,
        "-m",
        "kvmem.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--kv-budget",
        str(budget),
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(max_num_seqs),
        "--max-waiting",
        "1024",
    ]
    if policy is not None:
        argv += ["--policy", policy]
    if prefix_cache:
        argv.append("--prefix-cache")
    return ServerCommand(argv, {**os.environ, "HF_HUB_OFFLINE": "1"}, budget)


def vllm_serve(
    python: Path,
    folder: Path,
    name: str,
    spec: ModelSpec,
    port: int,
    budget: int,
    dtype: str,
    max_num_seqs: int,
    max_model_len: int = 4096,
    extra: Sequence[str] = (),
) -> ServerCommand:
    """``extra``: more vLLM options (``--kv-transfer-config``, …)."""
    element = 4 if dtype == "float32" else 2
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element
    blocks = budget // (VLLM_BLOCK * per_token)
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(max_num_seqs),
        "--block-size",
        str(VLLM_BLOCK),
        "--num-gpu-blocks-override",
        str(blocks),
        *extra,
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB reserved; the blocks actually used are overridden above
        "VLLM_CPU_OMP_THREADS_BIND": "0",  # a 2-core machine: no core reserved for the front end
        "HF_HUB_OFFLINE": "1",
    }
    return ServerCommand(argv, env, blocks * VLLM_BLOCK * per_token)


@contextmanager
def running(command: ServerCommand, port: int, log: Path, ready_s: float = 600) -> Iterator[int]:
    """Start the server, wait for ``/health``, yield its pid; stop it (and its children) at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command.argv, env=command.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            if not wait_ready("127.0.0.1", port, ready_s):
                raise RuntimeError(f"the server did not start in {ready_s:.0f} s; see {log}")
            yield proc.pid
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
