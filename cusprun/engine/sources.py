"""Where the engine gets a model's pieces, one decoder layer at a time.

* :class:`InMemoryLayers` — a loaded Hugging Face model: its own modules.
* :class:`StreamedLayers` — a checkpoint read lazily (memory-mapped safetensors shards, :class:`SafetensorsFiles`,
  or a GGUF file, :class:`~cusprun.formats.gguf_tensors.GGUFTensors`): only one decoder layer's weights are
  materialized on the device at a time, so models larger than the device (Llama-3-70B on one 80 GB GPU) can
  be scored.

Both implement :class:`LayerSource` and give the engine the same modules and the same per-layer
attention masks the model's own forward pass would build, so streamed and in-memory runs compute
bit-identical scores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from ..core.architectures import sliding_window
from ..core.errors import CusprunError


def layer_mask(config, attn, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The attention mask the model's forward passes to this layer (None when SDPA's is_causal suffices)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    make = create_sliding_window_causal_mask if sliding_window(attn, config) is not None else create_causal_mask
    # no cache: passed by position, since its keyword was renamed (past_key_values -> cache) within transformers 5
    return make(config, hidden, None, None, position_ids=position_ids)


def align_parameters(model: torch.nn.Module, alignment: int = 64) -> None:
    """Re-home parameters that do not start on an ``alignment``-byte boundary (loaders can leave them as
    views into a file's buffer): vectorized kernels round differently on misaligned data, and scores
    must not depend on how the weights happened to be loaded. Values are unchanged; ties are kept."""
    for param in model.parameters():
        if param.data_ptr() % alignment:
            param.data = param.data.clone()


class LayerSource(Protocol):
    """What the engine needs of a model, one decoder layer at a time."""

    config: object  # the Hugging Face config
    device: torch.device
    dtype: torch.dtype

    def embed(self, ids: list[int]) -> torch.Tensor:
        """Token ids of one document -> its input hidden states [1, L, hidden] on ``device``."""

    def release_embedding(self) -> None:
        """The embedding is no longer needed (every document is embedded)."""

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (cos, sin) [1, L, head_dim] at ``position_ids`` [1, L]."""

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer ``index``, on ``device`` until :meth:`release`."""

    def release(self, index: int) -> None:
        """Decoder layer ``index`` is done: free what it holds."""


class InMemoryLayers:
    """Pieces of a model that is already loaded."""

    def __init__(self, model):
        align_parameters(model)
        self.config = model.config
        self.inner = model.model
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.inner.embed_tokens(torch.tensor([ids], device=self.device))

    def release_embedding(self) -> None:
        """Nothing to free: the whole model stays loaded."""

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.inner.rotary_emb(hidden, position_ids)

    def layer(self, index: int) -> torch.nn.Module:
        return self.inner.layers[index]

    def release(self, index: int) -> None:
        """Nothing to free: the whole model stays loaded."""


class TensorFiles(Protocol):
    """A checkpoint's tensors by Hugging Face name, read on demand (safetensors shards or a GGUF file)."""

    names: set[str]

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{name: tensor at ``dtype``}, materialized now; the rest stays on disk."""


class SafetensorsFiles:
    """The tensors of a folder's safetensors files (single file or sharded with an index), memory-mapped."""

    def __init__(self, folder: str | Path):
        self.files = _tensor_files(Path(folder))
        self.names = set(self.files)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise CusprunError(f"tensor {name} is missing from the model's safetensors files")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():  # each shard is opened (memory-mapped) once per call
            with safe_open(file, framework="pt", device="cpu") as fh:
                out.update({name: fh.get_tensor(name).to(dtype).contiguous() for name in group})
        return out


def open_tensors(source, config) -> TensorFiles:
    """The tensors of the model ``open_model`` gave ``source`` and ``config`` for: its safetensors files, or its
    GGUF file (:class:`~cusprun.formats.gguf_tensors.GGUFTensors`). One line where there are neither."""
    from ..core.models import local_folder

    if source.gguf_file:
        from ..formats.gguf_tensors import GGUFTensors

        return GGUFTensors(Path(source.path) / source.gguf_file, config)
    folder = local_folder(source)
    if folder is None:
        raise CusprunError(f"streaming needs the model's files on this machine; {source.model_id} has none")
    return SafetensorsFiles(folder)


def loaded_bytes(source, dtype: torch.dtype) -> int:
    """What the weights of ``source`` take loaded at ``dtype``: every tensor's elements (from the safetensors
    headers or the GGUF tensor table, nothing else read) times ``dtype``'s size, so a bfloat16 checkpoint loaded
    in float32 counts twice its files and a 4-bit GGUF eight times; 0 where the files are not on this machine."""
    from ..core.models import local_folder

    if source.gguf_file:
        from gguf import GGUFReader

        reader = GGUFReader(str(Path(source.path) / source.gguf_file))
        return sum(int(t.n_elements) for t in reader.tensors) * dtype.itemsize
    folder = local_folder(source)
    total = 0
    for file in sorted(folder.glob("*.safetensors")) if folder is not None else []:
        try:
            with safe_open(str(file), framework="pt") as fh:
                total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys()) * dtype.itemsize
        except Exception:  # a damaged file counts its size here; the loader names the damage in one line later,
            total += file.stat().st_size  # after the checks that need no weights
    return total


class StreamedLayers:
    """Pieces of a checkpoint (``tensors``: :class:`TensorFiles`), materialized on ``device`` only while in use."""

    def __init__(self, tensors: TensorFiles, config, dtype: torch.dtype, device: str | torch.device):
        from transformers import AutoModelForCausalLM

        self.tensors, self.config, self.dtype, self.device = tensors, config, dtype, torch.device(device)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype).model
        # RoPE tables are computed at construction: build the small rotary module for real.
        with self.device:
            self.rotary_module = type(self.skeleton.rotary_emb)(config=config)
        self._embed = None

    def _load(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        module.to_empty(device=self.device)
        names = list(module.state_dict())
        state = self.tensors.read([prefix + name for name in names], self.dtype)
        module.load_state_dict({name: state[prefix + name] for name in names}, strict=True)
        return module.eval()

    def embed(self, ids: list[int]) -> torch.Tensor:
        if self._embed is None:
            self._embed = self._load(self.skeleton.embed_tokens, "model.embed_tokens.")
        return self._embed(torch.tensor([ids], device=self.device))

    def release_embedding(self) -> None:
        if self._embed is not None:
            self._embed.to("meta")
            self._embed = None

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary_module(hidden, position_ids)

    def layer(self, index: int) -> torch.nn.Module:
        return self._load(self.skeleton.layers[index], f"model.layers.{index}.")

    def release(self, index: int) -> None:
        self.skeleton.layers[index].to("meta")  # frees the device copy


def _tensor_files(model_dir: Path) -> dict[str, str]:
    """tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(model_dir / file) for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CusprunError(f"streaming needs safetensors weights; none in {model_dir}")
    with safe_open(str(single), framework="pt") as fh:
        return {name: str(single) for name in fh.keys()}
