"""A llama.cpp GGUF file's tensors by Hugging Face name, read one at a time (what ``--stream`` reads from a GGUF).

transformers loads a GGUF model whole: every tensor dequantized at once. :class:`GGUFTensors` gives the same
tensors one by one from the memory-mapped file, so a streamed run holds one decoder layer's weights at a time:
gguf-py's ``dequantize`` (float32, the values transformers' loader computes, compared in tests), the name
llama.cpp's converter gave it mapped back with gguf-py's own tensor-name table, and for the ``llama``
architecture the query and key rows put back in Hugging Face's rotary order (llama.cpp's converter interleaves
each head's two halves; Qwen2 files are not permuted). Other GGUF architectures are refused in one line:
their converters change tensors in ways this reader does not undo.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CusprunError
from .gguf import rotary_unpermute

STREAMABLE_GGUF_ARCHITECTURES = ("llama", "qwen2")


class GGUFTensors:
    """The tensors of ``path`` (a GGUF file of ``config``'s model) by Hugging Face name. Every mapped tensor's type
    and shape is checked here, so a file this reader cannot dequantize fails in one line before any work, not at
    layer 40."""

    def __init__(self, path: str | Path, config):
        from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
        from gguf.quants import _type_traits

        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))  # memory-mapped: nothing is read until a tensor is asked for
        except Exception as exc:
            raise CusprunError(f"cannot read the GGUF file {self.path}: {type(exc).__name__}: {exc}") from None
        self.architecture = self._field("general.architecture") or "unknown"
        if self.architecture not in STREAMABLE_GGUF_ARCHITECTURES:
            raise CusprunError(f"--stream reads GGUF files of the {' and '.join(STREAMABLE_GGUF_ARCHITECTURES)} "
                               f"architectures; {self.path.name} is {self.architecture}")
        self.config = config
        # transformers un-permutes llama's q/k rows only when the file states both head counts (its config
        # falls back to defaults otherwise); doing the same keeps the streamed tensors equal to the loaded ones
        self.unpermute = self.architecture == "llama" and all(
            self._field(f"llama.attention.{key}") is not None for key in ("head_count", "head_count_kv"))
        arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == self.architecture)
        names = get_tensor_name_map(arch, config.num_hidden_layers)
        self.by_gguf_name = {t.name: t for t in self.reader.tensors}
        self._gguf_names: dict[str, str] = {}
        for hf in self._hf_names(config):
            stem, suffix = hf.rsplit(".", 1)
            gguf = names.get_name(stem)
            if gguf is not None and f"{gguf}.{suffix}" in self.by_gguf_name:
                self._gguf_names[hf] = f"{gguf}.{suffix}"
        readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
        for gguf in self._gguf_names.values():
            kind = self.by_gguf_name[gguf].tensor_type
            if kind not in readable:
                raise CusprunError(f"tensor {gguf} of {self.path.name} is {kind.name}, which gguf-py cannot "
                                   "dequantize (load the model in memory)")

    def _field(self, key: str):
        """A metadata value of the file (strings decoded, first element of arrays), None where absent."""
        field = self.reader.fields.get(key)
        if field is None or not field.data:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if value.dtype.kind == "u" and value.dtype.itemsize == 1 else value[0].item()

    @staticmethod
    def _hf_names(config) -> list[str]:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return list(AutoModelForCausalLM.from_config(config).state_dict())

    @property
    def names(self) -> set[str]:
        return set(self._gguf_names)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{name: tensor at ``dtype``} of Hugging Face names, dequantized one at a time from the mapped file."""
        out = {}
        for name in names:
            if name not in self._gguf_names:
                raise CusprunError(f"tensor {name} is missing from the GGUF file {self.path.name}")
            out[name] = self._read(self._gguf_names[name], dtype)
        return out

    def _read(self, gguf: str, dtype: torch.dtype) -> torch.Tensor:
        from gguf import dequantize

        tensor = self.by_gguf_name[gguf]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
            if self.unpermute and gguf.split(".")[-2] in ("attn_q", "attn_k"):
                heads = self.config.num_attention_heads if ".attn_q." in gguf else self.config.num_key_value_heads
                values = rotary_unpermute(values, heads)
            # copied where it is still the mapped file's memory (float32 tensors), which is read-only
            result = torch.from_numpy(np.require(values, np.float32, ["C", "W"])).to(dtype)
        except (ValueError, NotImplementedError) as exc:  # a damaged file or an odd shape: one line
            raise CusprunError(f"cannot read tensor {gguf} of {self.path.name}: {type(exc).__name__}: {exc}") from None
        self._release(tensor)
        return result

    def _release(self, tensor) -> None:
        """Drop the file pages of ``tensor`` from this process: the mapping holds the whole file, and pages once
        read stay resident (and counted in its RSS) until the kernel needs them; a streamed run holds one layer."""
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        self.reader.data._mmap.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)
