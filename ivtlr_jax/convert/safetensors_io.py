"""A small safetensors reader and writer on numpy: one tensor at a time, no torch, bf16 via ml_dtypes.

Format: 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data;
offsets are relative to the first data byte.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype tag -> numpy dtype (little endian).
_TAG_TO_DTYPE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_DTYPE_TO_TAG = {dt: tag for tag, dt in _TAG_TO_DTYPE.items()}


def dtype_from_tag(tag: str, where: str = "") -> np.dtype:
    """numpy dtype of a safetensors dtype tag; a clear error for tags this reader does not handle."""
    if tag not in _TAG_TO_DTYPE:
        raise ValueError(f"{where}dtype={tag!r} is not supported; supported: {sorted(_TAG_TO_DTYPE)}")
    return _TAG_TO_DTYPE[tag]


def tag_from_dtype(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_TO_TAG:
        supported = sorted(map(str, _DTYPE_TO_TAG))
        raise ValueError(f"dtype={dtype} cannot be written to safetensors; supported: {supported}")
    return _DTYPE_TO_TAG[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, byte range (absolute in the file), dtype and shape."""

    name: str
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in `path`
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one .safetensors header: ({name: TensorInfo}, metadata). Reads only the header bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: file of {size} bytes is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: header length {n} does not fit the file size {size}; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e}); not a safetensors file") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos = {}
    for name, entry in header.items():
        dtype = dtype_from_tag(entry["dtype"], where=f"{path}: tensor {name!r}: ")
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} has data_offsets={[begin, end]} ({end - begin} bytes) but "
                f"dtype {entry['dtype']} and shape {list(shape)} need {expected} bytes within a file of {size}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return infos, metadata


def find_safetensors_files(folder: str) -> list[str]:
    """The weight files of a model folder: those named by the index if there is one, else all *.safetensors."""
    if not os.path.isdir(folder):
        raise ValueError(f"--src {folder!r} is not a folder; give a Hugging Face model folder with *.safetensors")
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.exists(os.path.join(folder, name))]
        if missing:
            raise ValueError(f"{index_path}: weight_map names files that are not in the folder: {missing}")
        return [os.path.join(folder, name) for name in files]
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        present = sorted(os.listdir(folder))
        hint = " (*.bin/*.pt weights are not read: re-save with safe_serialization)" if any(
            p.endswith((".bin", ".pt", ".pth")) for p in present
        ) else ""
        raise ValueError(
            f"--src {folder!r} has no *.safetensors file and no {INDEX_NAME}; found {present[:20]}; "
            f"a Hugging Face model folder with safetensors weights is required{hint}"
        )
    return [os.path.join(folder, name) for name in files]


class SafetensorsReader:
    """All tensors of a model folder (single file or sharded with an index), read one at a time.

    Only headers are read at construction. `get(name)` maps just that tensor's bytes, copies them into a
    fresh numpy array and unmaps, so resident memory never holds more than one source tensor.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.files = find_safetensors_files(folder)
        self.infos: dict[str, TensorInfo] = {}
        for path in self.files:
            infos, _ = read_header(path)
            for name, info in infos.items():
                if name in self.infos:
                    raise ValueError(f"tensor {name!r} is stored twice: in {self.infos[name].path} and {path}")
                self.infos[name] = info

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as an owned numpy array of its stored dtype and shape."""
        info = self.infos[name]
        if info.nbytes == 0:
            return np.empty(info.shape, info.dtype)
        page = mmap.ALLOCATIONGRANULARITY
        offset = info.start - info.start % page
        with open(info.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), info.start - offset + info.nbytes, access=mmap.ACCESS_READ, offset=offset)
        try:
            view = np.frombuffer(mm, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                                 offset=info.start - offset)
            out = view.reshape(info.shape).copy()
            del view
        finally:
            mm.close()
        return out


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype and shape are known before its data exists."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(
    path: str,
    specs: Iterable[TensorSpec],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> int:
    """Write one .safetensors file, asking `produce(name)` for each tensor in turn; returns bytes written.

    The header is built from `specs`, so only one produced tensor is alive at a time.
    """
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": tag_from_dtype(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            arr = np.ascontiguousarray(produce(spec.name))
            if arr.shape != tuple(spec.shape) or arr.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"{path}: tensor {spec.name!r} was produced with shape {list(arr.shape)} dtype {arr.dtype}, "
                    f"but the header says shape {list(spec.shape)} dtype {np.dtype(spec.dtype)}"
                )
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
            if on_tensor is not None:
                on_tensor(spec)
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def shard_specs(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into groups of at most `max_shard_bytes` (a larger tensor gets its own group)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def write_sharded(
    folder: str,
    specs: list[TensorSpec],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> list[str]:
    """Write specs as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` plus the index when large."""
    shards = shard_specs(specs, max_shard_bytes)
    if len(shards) <= 1:
        path = os.path.join(folder, SINGLE_NAME)
        write_safetensors(path, specs, produce, metadata, on_tensor)
        return [path]
    paths, weight_map = [], {}
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, name), group, produce, metadata, on_tensor)
        paths.append(os.path.join(folder, name))
        weight_map.update({spec.name: name for spec in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
    return paths

