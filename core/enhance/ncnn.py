"""Convert ncnn (.param/.bin) weights of Real-ESRGAN models into PyTorch state dicts.

ncnn format facts used here (see ncnn's ``ModelBinFromDataReader::load``):

* the .param file is text: a magic line ``7767517``, ``layer_count blob_count``, then one line per layer:
  ``Type Name n_in n_out in_blobs... out_blobs... k=v ...``;
* in the .bin file a Convolution stores its weights with a 4-byte tag (``0x01306B47``: fp16 data,
  ``0``: fp32 data) followed by ``weight_data_size`` values, then (if ``5=1``) ``num_output`` fp32 biases
  with no tag; a PReLU stores ``num_slope`` fp32 slopes with no tag;
* the layers carrying weights come in the order of the PyTorch ``state_dict()`` of basicsr ``RRDBNet`` and
  realesrgan ``SRVGGNetCompact`` (conv weight, conv bias, PReLU weight, ...).

``write_ncnn`` is the inverse (weights only), used to prove the converter on small random models.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.fsio import atomic_write_bytes

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0


class NcnnFormatError(ValueError):
    """The .param/.bin pair is malformed or does not fit the target architecture."""


@dataclass
class NcnnLayer:
    type: str
    name: str
    params: dict[str, str]

    def int(self, key: int, default: int = 0) -> int:
        return int(self.params.get(str(key), default))


def parse_param(path: str | Path) -> list[NcnnLayer]:
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(MAGIC)]:
        raise NcnnFormatError(f"{path}: not an ncnn .param file (magic {MAGIC} missing)")
    n_layers = int(lines[1][0])
    layers = []
    for parts in lines[2 : 2 + n_layers]:
        n_in, n_out = int(parts[2]), int(parts[3])
        kv = parts[4 + n_in + n_out :]
        layers.append(NcnnLayer(parts[0], parts[1], dict(p.split("=", 1) for p in kv)))
    if len(layers) != n_layers:
        raise NcnnFormatError(f"{path}: header says {n_layers} layers, found {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise NcnnFormatError(f"{self.name}: truncated at byte {self.pos} (needs {nbytes} more)")
        out = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def raw_fp32(self, n: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * n), dtype="<f4").copy()

    def tagged(self, n: int) -> np.ndarray:
        (tag,) = struct.unpack("<I", self.take(4))
        if tag == TAG_FP16:
            buf = self.take((2 * n + 3) // 4 * 4)  # fp16 data is padded to 4 bytes
            return np.frombuffer(buf[: 2 * n], dtype="<f2").astype(np.float32)
        if tag == TAG_FP32:
            return self.raw_fp32(n)
        raise NcnnFormatError(f"{self.name}: unsupported weight tag 0x{tag:08X} at byte {self.pos - 4}")


def read_ncnn_arrays(param_path: str | Path, bin_path: str | Path) -> list[tuple[str, np.ndarray]]:
    """All weight arrays (flat float32) in file order, as ``(layer name/kind, array)``."""
    reader = _Reader(Path(bin_path).read_bytes(), str(bin_path))
    arrays: list[tuple[str, np.ndarray]] = []
    for layer in parse_param(param_path):
        if layer.type == "Convolution":
            if layer.int(8):
                raise NcnnFormatError(f"{layer.name}: int8 convolutions are not supported")
            arrays.append((f"{layer.name}.weight", reader.tagged(layer.int(6))))
            if layer.int(5):
                arrays.append((f"{layer.name}.bias", reader.raw_fp32(layer.int(0))))
        elif layer.type == "PReLU":
            arrays.append((f"{layer.name}.slope", reader.raw_fp32(layer.int(0))))
        elif layer.type in ("Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"):
            continue  # no weights
        else:
            raise NcnnFormatError(f"{param_path}: layer type {layer.type} ({layer.name}) is not supported")
    if reader.pos != len(reader.data):
        raise NcnnFormatError(f"{bin_path}: {len(reader.data) - reader.pos} unread bytes after the last layer")
    return arrays


def ncnn_to_state_dict(param_path: str | Path, bin_path: str | Path, template: dict) -> "OrderedDict":
    """Fill ``template`` (a model's ``state_dict()``) with the ncnn weights, in order; shapes are checked."""
    import torch

    arrays = read_ncnn_arrays(param_path, bin_path)
    keys = list(template)
    if len(arrays) != len(keys):
        raise NcnnFormatError(f"{param_path}: {len(arrays)} weight arrays for {len(keys)} state-dict entries")
    out = OrderedDict()
    for key, (src, arr) in zip(keys, arrays):
        shape = tuple(template[key].shape)
        if arr.size != int(np.prod(shape)):
            raise NcnnFormatError(f"{src}: {arr.size} values do not fit {key} {shape}")
        out[key] = torch.from_numpy(arr.reshape(shape))
    return out


def write_ncnn(model, param_path: str | Path, bin_path: str | Path) -> None:
    """Write the Conv2d/PReLU weights of ``model`` as an ncnn .param/.bin pair (fp16 conv weights)."""
    import torch.nn as nn

    lines, blobs, chunks = [], 1, []
    lines.append("Input input 0 1 b0")
    for name, m in model.named_modules():
        prev, cur = f"b{blobs - 1}", f"b{blobs}"
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().cpu().numpy()
            has_bias = m.bias is not None
            lines.append(f"Convolution {name or 'conv'} 1 1 {prev} {cur} 0={w.shape[0]} 1={w.shape[-1]} "
                         f"4={m.padding[0]} 5={int(has_bias)} 6={w.size}")
            half = w.astype("<f2").tobytes()
            chunks += [struct.pack("<I", TAG_FP16), half, b"\0" * (-len(half) % 4)]
            if has_bias:
                chunks.append(m.bias.detach().cpu().numpy().astype("<f4").tobytes())
        elif isinstance(m, nn.PReLU):
            lines.append(f"PReLU {name} 1 1 {prev} {cur} 0={m.weight.numel()}")
            chunks.append(m.weight.detach().cpu().numpy().astype("<f4").tobytes())
        else:
            continue
        blobs += 1
    atomic_write_bytes(param_path, (f"{MAGIC}\n{len(lines)} {blobs}\n" + "\n".join(lines) + "\n").encode())
    atomic_write_bytes(bin_path, b"".join(chunks))
