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


def test_loading_shows_no_transformers_bars_and_restores_them(
    tmp_path: Path, llama: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    folder = save_folder(llama, tmp_path / "tiny")
    capsys.readouterr()
    hf_logging.enable_progress_bar()
    load_model(str(folder))
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # as the caller had it


def test_gguf_conversion_bars_stay_off_a_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    original = gguf_reader.tqdm

    class Saved:
        config = object()

        def save_pretrained(self, folder: str) -> None:
            Path(folder, "config.json").write_text("{}")

    class FakeAuto:  # transformers' GGUF reader draws its per-tensor bar while loading
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> Saved:
            for _ in gguf_reader.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
                pass
            return Saved()

    monkeypatch.setattr(loader, "AutoTokenizer", FakeAuto)
    monkeypatch.setattr(loader, "AutoModelForCausalLM", FakeAuto)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with loader._without_transformers_bars():
        loader._convert_gguf(gguf, tmp_path / "converted")
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar, no escape codes
    assert (tmp_path / "converted" / "config.json").is_file()
    assert gguf_reader.tqdm is original
