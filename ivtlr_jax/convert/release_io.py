"""Reading the authors' release file: one `torch.save`d state dict (read with weights_only=True and mmap=True, one
tensor at a time, its file pages given back after each) or a safetensors file holding the same dict."""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import sys

import numpy as np

from ivtlr_jax.convert.safetensors_io import SafetensorsReader, read_header

log = logging.getLogger(__name__)

TORCH_INSTALL = ("pip install 'ivtlr_jax[torch]' --extra-index-url https://download.pytorch.org/whl/cpu "
                 "(the CPU build of the pinned torch; a bare `pip install torch` pulls a multi-GB CUDA wheel)")


def import_torch(what: str):
    """torch, or a ValueError that says how to install the optional extra."""
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{what}: reading a torch .pth file needs PyTorch, which is not installed; install it with "
                         f"{TORCH_INSTALL}, or give a safetensors file holding the same dict") from e
    return torch


_MADV_DONTNEED = 4


def _drop_pages(address: int, nbytes: int) -> None:
    """Give back the resident pages of a read-only private file mapping (Linux); a no-op elsewhere.

    Pages of an mmap-ed file count in the process's resident memory once touched; dropping them after
    each tensor keeps peak memory at the output plus one tensor. The mapping stays valid (re-read on use).
    """
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    if end > start:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))
        except (OSError, AttributeError):
            pass


class TorchRelease:
    """A `torch.save`d state dict, loaded with weights_only=True (no code runs) and mmap=True (nothing is read).

    `get(name)` copies one tensor into an owned numpy array and drops its file pages again.
    """

    def __init__(self, path: str):
        torch = import_torch(f"--from-release {path!r}")
        self.path, self._torch, self._mmap = path, torch, True
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                log.warning("%s: %s; reading it without mmap (the whole file goes to memory)", path, e)
                self._mmap = False
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
            first = " ".join(detail.split()) or type(e).__name__
            if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
                raise ValueError(f"--from-release {path!r} is neither a torch checkpoint nor a safetensors file "
                                 f"({first})") from None
            raise ValueError(
                f"--from-release {path!r}: refused by torch.load(weights_only=True): the file needs code execution "
                f"to unpickle, which a plain state dict of tensors never does ({first}); it is not the authors' "
                "release, or it was tampered with") from None
        if not isinstance(obj, dict):
            raise ValueError(f"--from-release {path!r} holds a {type(obj).__name__}, expected a dict of tensors "
                             "(the state dict written by zero_to_fp32)")
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"--from-release {path!r}: entries that are not tensors: {[str(b) for b in bad[:10]]}; "
                             "expected a flat dict name -> tensor")
        self._tensors = obj
        self.shapes = {k: tuple(v.shape) for k, v in obj.items()}
        self.dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in obj.items()}

    def same_storage(self, a: str, b: str) -> bool:
        ta, tb = self._tensors[a], self._tensors[b]
        return ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr() and \
            ta.storage_offset() == tb.storage_offset() and ta.stride() == tb.stride() and ta.shape == tb.shape

    def get(self, name: str) -> np.ndarray:
        import ml_dtypes

        t = self._tensors[name].detach()
        if t.dtype == self._torch.bfloat16:
            view = t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif t.is_floating_point() or t.dtype in (self._torch.int64, self._torch.int32, self._torch.bool):
            view = t.numpy()
        else:
            raise ValueError(f"--from-release {self.path!r}: tensor {name!r} has dtype {t.dtype}, which this "
                             "converter does not read (float32, bfloat16, float16)")
        out = np.array(view, copy=True)
        del view
        if self._mmap:  # file-backed pages only: dropping anonymous memory would lose its contents
            storage = t.untyped_storage()
            _drop_pages(storage.data_ptr(), storage.nbytes())
        return out


class SafetensorsRelease(SafetensorsReader):
    """One safetensors file holding the release's dict (header only at construction, one tensor per get)."""

    def __init__(self, path: str):
        self.folder, self.files = os.path.dirname(path), [path]
        self.infos, _ = read_header(path)
        self.path = path
        self.shapes = {k: tuple(i.shape) for k, i in self.infos.items()}
        self.dtypes = {k: str(i.dtype) for k, i in self.infos.items()}

    def same_storage(self, a: str, b: str) -> bool:
        return False

    def get(self, name: str) -> np.ndarray:
        """The tensor read straight into a new array (no mapping: file pages never count as our memory)."""
        info = self.infos[name]
        out = np.empty(info.shape, info.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                n = f.readinto(buf[done:])
                if not n:
                    raise ValueError(f"--from-release {self.path!r}: tensor {name!r} ends past the end of the file")
                done += n
        return out


def open_release(path: str):
    """The reader for a release file: a torch zip/pickle (.pth, .pt, .bin) or a safetensors file."""
    if not os.path.isfile(path):
        raise ValueError(f"--from-release {path!r} is not a file; give the release's .pth (or a safetensors file "
                         "holding the same dict)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and _looks_like_safetensors(path):  # not a torch zip: a safetensors header?
        return SafetensorsRelease(path)
    if path.endswith(".safetensors"):
        read_header(path)  # raises, saying what is wrong with it
    return TorchRelease(path)  # a torch zip, or a legacy torch pickle


def _looks_like_safetensors(path: str) -> bool:
    try:
        read_header(path)
        return True
    except (ValueError, OSError):
        return False
