"""README.md's and docs/*.md's ```bash and ```python blocks, run as written: a snippet that does not
run fails here; and every relative link in them points at a file (and a heading) that exists.

The convention, visible in the README itself:

- every block runs, unless the line just before its fence is ``<!-- readme-test: skip (why) -->``;
  a skip without a reason, or a ``readme-test`` comment of any other shape, fails;
- a bash block runs as one ``bash -e -o pipefail`` script in which ``kvmem`` is the CLI under test
  (``python -m kvmem.cli``) and ``curl`` fails on an HTTP error; ``kvmem serve`` starts the server in
  the background on a free 127.0.0.1 port (the README's 8000 is replaced by it), returns once it
  answers ``/health``, and is stopped with the block;
- a python block runs alone in a fresh interpreter (so each imports what it uses); one that talks to
  ``127.0.0.1:8000`` runs against the server that the closest ``kvmem serve … --port 8000`` line above
  it in the same file starts.

Relative paths in a block (README or docs) are the repository root's
(``src/kvmem/data/harbor_town.txt``); files the snippets write must not land in the repository or
the user's cache, so each block runs in a temporary folder where ``src`` links to the repository's,
with a temporary kvmem cache folder that links the real one's converted ``models`` and compiled
``kernels``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from kvmem.model.loader import cache_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # every file whose blocks run
BLOCK_TIMEOUT_S = 600  # a bound against a hang, never the expectation (minutes only on a crowded machine)
FENCE = re.compile(r"^```(bash|python)\s*$")
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<why>[^)].*)\) -->$")
SERVE_8000 = re.compile(r"^kvmem serve\b.*--port 8000\b.*$", re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
ISSUE_REF = re.compile(r"\bissues?\s+#?\d+|(?<![\w&/])#\d+\b|\bthe issues\b", re.IGNORECASE)

PRELUDE = r"""set -eo pipefail
kvmem() {
  if [ "$1" = serve ]; then  # in the background, on the test's port, until the block ends
    "$KVMEM_PY" -m kvmem.cli "$@" --port "$PORT" >>"$SERVER_LOG" 2>&1 &
    local pid=$!
    for _ in $(seq 1200); do
      command curl -s -o /dev/null "http://127.0.0.1:$PORT/health" && return 0
      kill -0 "$pid" 2>/dev/null || { cat "$SERVER_LOG" >&2; return 1; }
      sleep 0.1
    done
    echo "kvmem serve did not answer in 120 s" >&2; return 1
  fi
  "$KVMEM_PY" -m kvmem.cli "$@"
}
curl() { command curl --fail-with-body "$@"; }
"""


class Block(NamedTuple):
    doc: str  # the file, relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str  # "bash" or "python"
    text: str
    skip: str | None  # why it is not run; None: it runs


def readme_blocks(text: str, doc: str = "README.md") -> list[Block]:
    """Every ```bash and ```python block of ``doc``, with the skip marker on the line before its fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = lines.index("```", i + 1)
        before = lines[i - 1].strip() if i else ""
        skip = SKIP.match(before)
        if "readme-test" in before and not skip:
            raise ValueError(f"{doc}:{i}: a readme-test marker must read <!-- readme-test: skip (why) -->")
        blocks.append(
            Block(
                doc,
                i + 1,
                match.group(1),
                "\n".join(lines[i + 1 : end]) + "\n",
                skip.group("why").strip() if skip else None,
            )
        )
        i = end + 1
    return blocks


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _prose(text: str) -> str:
    """``text`` without its fenced blocks and inline code: what a reader sees as links and words."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


BLOCKS = [b for path in DOCS for b in readme_blocks(path.read_text(encoding="utf-8"), _name(path))]


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_every_marker_is_a_skip_with_its_reason(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    markers = [line for line in _prose(text).splitlines() if "readme-test" in line]  # not in `code`
    assert all(SKIP.match(line.strip()) for line in markers), markers
    skipped = sum(b.skip is not None for b in BLOCKS if b.doc == _name(path))
    assert len(markers) == skipped  # each is right before a block


def test_most_blocks_run() -> None:
    assert sum(b.skip is None for b in BLOCKS) >= 10


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives ``path``'s headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    for line in re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_every_relative_link_exists(path: Path) -> None:
    broken = []
    for match in LINK.finditer(_prose(path.read_text(encoding="utf-8"))):
        target = match.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved}")
    assert not broken, f"{path}: " + "; ".join(broken)


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_no_issue_numbers(path: Path) -> None:
    """The docs state what is; a reader cannot open the tracker they were written against."""
    assert not ISSUE_REF.findall(_prose(path.read_text(encoding="utf-8")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like the repository root to relative paths, with its own kvmem cache."""
    work = tmp_path_factory.mktemp("readme")
    (work / "src").symlink_to(ROOT / "src")
    cache = work / "kvmem-cache"
    cache.mkdir()
    for name in ("models", "kernels"):  # converted weights and the compiled kernel: made once, shared
        (cache_dir() / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(cache_dir() / name)
    return work


def script_for(block: Block, port: int) -> str:
    """The bash script that runs ``block``: a bash block as it is; a python block through the
    interpreter, after the README's server line above it where it needs a server."""
    if block.lang == "bash":
        return PRELUDE + block.text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    code = block.text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    serve = ""
    if f"127.0.0.1:{port}" in code:
        above = [
            b
            for b in BLOCKS
            if b.doc == block.doc and b.lang == "bash" and b.line < block.line and SERVE_8000.search(b.text)
        ]
        assert above, (
            f"{block.doc}:{block.line} talks to 127.0.0.1:8000 but no `kvmem serve --port 8000` precedes it"
        )
        serve = SERVE_8000.findall(above[-1].text)[-1] + "\n"
    return PRELUDE + serve + f"\"$KVMEM_PY\" - <<'KVMEM_README_PY'\n{code}KVMEM_README_PY\n"


@pytest.mark.real
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.doc}-{b.lang}-line{b.line}" for b in BLOCKS])
def test_readme_block_runs(block: Block, workdir: Path) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    port = free_port()
    env = {
        **os.environ,
        "KVMEM_PY": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "KVMEM_CACHE_DIR": str(workdir / "kvmem-cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PORT": str(port),
        "SERVER_LOG": str(workdir / f"serve-{block.doc.replace('/', '-')}-{block.line}.log"),
    }
    env.pop("KVMEM_OFFLOAD_DIR", None)  # offloaded blocks under the temporary cache folder
    proc = subprocess.Popen(
        ["bash", "-c", script_for(block, port)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a server it started goes with it
    )
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{block.doc}:{block.line} ran past {BLOCK_TIMEOUT_S} s\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        _stop_group(proc.pid)
    assert proc.returncode == 0, f"{block.doc}:{block.line} failed\n{out[-3000:]}\n{err[-3000:]}"


def _stop_group(pgid: int) -> None:
    """Stop what the block left running (a server): SIGTERM drains it; SIGKILL after 30 s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(300):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
