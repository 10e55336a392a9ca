"""Loading a model by embedded name, Hugging Face folder or ``.gguf`` file.

A GGUF file is converted once (dequantized to float32 by transformers' GGUF loader) into a
safetensors folder under kvmem's cache folder (``KVMEM_CACHE_DIR``, else ``~/.cache/kvmem``);
later loads read that folder in seconds. Nothing here touches the network. Progress bars show
only on a terminal: kvmem's own while it converts, none of transformers' ("Loading weights").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from kvmem.errors import ModelNotFoundError
from kvmem.model.device import resolve_device
from kvmem.model.dtype import resolve_dtype
from kvmem.model.identity import model_identity
from kvmem.model.registry import EMBEDDED, EmbeddedModel, embedded_names
from kvmem.model.spec import ModelSpec

_DONE_MARKER = "kvmem-converted.json"
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for kvmem: weights, tokenizer, and the KV shape of its attention."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    has_chat_template: bool

    @functools.cached_property
    def identity(self) -> str:
        """What saved or shared KV state must match (``kvmem.model.identity``)."""
        return model_identity(self.model)


def cache_dir() -> Path:
    """kvmem's cache folder: ``$KVMEM_CACHE_DIR`` or ``~/.cache/kvmem``."""
    env = os.environ.get("KVMEM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvmem"


def load_model(
    name_or_path: str, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load an embedded model (``smollm2-135m``, ``gemma3-270m``), a model folder or a ``.gguf`` file,
    in ``dtype`` (a torch dtype, ``"float32"``, ``"bfloat16"`` or ``"auto"``: see ``kvmem.model.dtype``)
    on ``device``.

    Raises ``ModelNotFoundError`` (listing the embedded names) for anything else, and
    ``UnsupportedDeviceError`` for a device this machine does not have.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _without_transformers_bars():
        folder = resolve_model_folder(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return LoadedModel(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        spec=ModelSpec.from_config(model.config, dtype),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """transformers' progress bars off while kvmem loads a model (on every ``LLM(...)`` they said
    "Loading weights"), back as they were afterwards. Its GGUF reader draws one with tqdm directly,
    past that switch: it is kept to terminals, as kvmem's own bars are."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    bar = getattr(gguf_reader, "tqdm", None)  # None if a later transformers draws it otherwise
    try:
        if bar is not None:
            gguf_reader.tqdm = functools.partial(bar, disable=None)
        yield
    finally:
        if bar is not None:
            gguf_reader.tqdm = bar
        if was_on:
            hf_logging.enable_progress_bar()


def resolve_model_folder(name_or_path: str) -> Path:
    """The folder transformers loads: converting an embedded or ``.gguf`` model first if needed."""
    if name_or_path in EMBEDDED:
        embedded = EMBEDDED[name_or_path]
        target = cache_dir() / "models" / embedded.name
        if not _is_converted(target):
            _convert_embedded(embedded, target)
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json; {_known()}")
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{path.stem}-{key}"
        if not _is_converted(target):
            _convert_gguf(path, target)
        return target
    if path.is_file():
        raise ModelNotFoundError(f"{path} is not a .gguf file; {_known()}")
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: no such embedded model, folder or file; {_known()}"
    )


def _known() -> str:
    return "embedded models: " + ", ".join(embedded_names()) + " (or give a model folder or a .gguf file)"


def _is_converted(target: Path) -> bool:
    marker = target / _DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == _CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def _convert_embedded(embedded: EmbeddedModel, target: Path) -> None:
    parts = embedded.part_paths()
    if len(parts) == 1:
        _convert_gguf(parts[0], target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assemble-") as tmp:
        gguf = Path(tmp) / embedded.gguf_name
        total = sum(p.stat().st_size for p in parts)
        with (
            gguf.open("wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"kvmem: assembling {embedded.name}",
                disable=None,
            ) as bar,
        ):
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        bar.update(len(chunk))
        _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a safetensors model folder, atomically (temp folder + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        # disable=None: a bar on a terminal only (elsewhere its redraws are escape codes in a log)
        with tqdm(total=3, desc=f"kvmem: converting {gguf.name} (once)", unit="step", disable=None) as bar:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            bar.update(1)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            bar.update(1)
            # The weights are now plain float32 tensors; drop the GGUF quantization marker so
            # transformers saves and reloads them as an ordinary model.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None  # type: ignore[assignment]
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / _DONE_MARKER).write_text(json.dumps({"version": _CONVERSION_VERSION, "source": str(gguf)}))
            bar.update(1)
        if _is_converted(target):  # another process finished the same conversion first
            return
        if target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_converted(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
