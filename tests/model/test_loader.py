from pathlib import Path

import pytest

from kvmem.errors import ModelNotFoundError
from kvmem.model import loader
from kvmem.model.loader import LoadedModel, load_model, resolve_model_folder
from tiny_models import save_folder


def test_unknown_name_lists_the_embedded_models() -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m, .*gemma3-270m|gemma3-270m, smollm2-135m"):
        load_model("no-such-model")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_folder(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model_folder(str(path))


def test_model_folder_loads(tmp_path: Path, llama: LoadedModel) -> None:
    folder = save_folder(llama, tmp_path / "tiny")
    loaded = load_model(str(folder))
    assert loaded.spec == llama.spec
    assert loaded.has_chat_template


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVMEM_CACHE_DIR", str(tmp_path))
    assert loader.cache_dir() == tmp_path


@pytest.mark.real
def test_embedded_model_is_converted_once(smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # the session fixture converted it already; a second resolve must not convert again
    def fail(*_: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(loader, "_convert_gguf", fail)
    folder = resolve_model_folder("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert smollm2.spec.num_layers == 30 and smollm2.spec.num_kv_heads == 3
