"""privfl's cache folder and the shared store in it: one read-only, memory-mapped pool per
decoded dataset split, used by every process.

A pool file is keyed by its sources' paths, sizes and mtimes, written atomically under a
lock, CRC-checked when opened and rebuilt if damaged; its tensors are
:class:`_ReadOnlyTensor`, whose in-place writes raise instead of crashing the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privfl.data.imageset import DataError, ImageSet


def cache_dir() -> Path:
    """privfl's own cache: ``$PRIVFL_CACHE`` or ``~/.cache/privfl``."""
    env = os.environ.get("PRIVFL_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "privfl"


def _download_root() -> Path:
    # Downloads go to privfl's cache, never into a user's (possibly shared) root.
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _ReadOnlyTensor(torch.Tensor):
    """A tensor over read-only shared memory (a memory-mapped pool).

    Writing into such memory would kill the process with a segmentation fault, so in-place
    operations on it (``x[i] = v``, ``x.add_(...)``, ``out=x``, ``inplace=True``) raise
    instead; every result that still aliases the memory (slices, views) stays read-only,
    and every other result is an ordinary tensor.
    """

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if _writes_read_only(func, args, kwargs):
                name = getattr(func, "__name__", str(func))
                raise RuntimeError(
                    f"{name}: this tensor is privfl's read-only data pool, shared by every "
                    "process; write into a copy (.clone()) instead"
                )
            spans = [_span(t) for t in _tensors((args, kwargs)) if isinstance(t, cls)]
            return _keep_read_only(func(*args, **kwargs), spans)


_INPLACE_DUNDERS = frozenset(
    ["__setitem__"]
    + [f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod")]
    + [f"__i{op}__" for op in ("pow", "lshift", "rshift", "and", "or", "xor")]
)


def _writes_read_only(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    target = args[0] if args else None
    inplace = name in _INPLACE_DUNDERS or (
        name.endswith("_") and not name.startswith("__") and name != "requires_grad_"
    )
    if isinstance(target, _ReadOnlyTensor) and (inplace or kwargs.get("inplace") is True):
        return True
    return any(isinstance(t, _ReadOnlyTensor) for t in _tensors(kwargs.get("out")))


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _keep_read_only(out: Any, spans: list[tuple[int, int]]) -> Any:
    """``out`` with every tensor that aliases one of ``spans`` made read-only again, and
    every numpy array that does marked non-writable."""
    if isinstance(out, torch.Tensor):
        if (
            out.layout == torch.strided
            and out.device.type == "cpu"
            and out.untyped_storage().data_ptr() in {s[0] for s in spans}
        ):
            return out.as_subclass(_ReadOnlyTensor)
        return out
    if isinstance(out, np.ndarray):
        ptr = out.__array_interface__["data"][0]
        if any(lo <= ptr < hi for lo, hi in spans):
            out.flags.writeable = False
        return out
    if isinstance(out, tuple | list):
        return type(out)(_keep_read_only(o, spans) for o in out)
    return out


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A read-only tensor over ``array``'s (read-only, memory-mapped) memory, no copy."""
    with warnings.catch_warnings():
        # torch warns that it cannot mark tensors read-only; _ReadOnlyTensor does.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).as_subclass(_ReadOnlyTensor)


# --------------------------------------------------------------------------- shared pools

# A decoded split is written once to privfl's cache and memory-mapped read-only by every
# process that loads it (each Ray actor of a simulation), which then share its pages
# instead of decoding their own copy. Bump _POOL_FORMAT when decoding changes.
_POOL_FORMAT = 1
_POOL_MAGIC = b"PRIVFLPOOL\n"
_POOL_ALIGN = 4096
_BUILDS: Counter[str] = Counter()  # decodes done by this process, per pool name


def _shared_pool(name: str, files: Sequence[Path], build: Callable[[], ImageSet]) -> ImageSet:
    """``build()``'s set, decoded once for all processes: memory-mapped from a cache file
    keyed by ``name`` and the path, size and mtime of each of ``files`` (its sources).

    A missing, truncated or corrupt cache file is (re)built under a lock, written to a
    temporary file and renamed into place; where the cache cannot be written the set is
    kept in this process's memory instead.
    """
    built = None
    if not all(f.is_file() for f in files):
        built = _build(name, build)  # e.g. a download, which lays the files out
    key = _pool_key(name, files)
    path = cache_dir() / "pools" / f"{name}-{key[:24]}.pool"
    pool = _open_pool(path, key)
    if pool is not None:
        return pool
    with ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(path.parent / ".lock"))  # one for all: builds are rare
        except OSError as exc:
            return _unshared(path, exc, built if built is not None else _build(name, build))
        pool = _open_pool(path, key)  # another process may have built it meanwhile
        if pool is not None:
            return pool
        if built is None:
            built = _build(name, build)  # outside the try: a decoding error is the data's
        try:
            _write_pool(path, key, built)
        except OSError as exc:
            return _unshared(path, exc, built)
        pool = _open_pool(path, key)
    return pool if pool is not None else built


def _unshared(path: Path, exc: OSError, built: ImageSet) -> ImageSet:
    warnings.warn(
        f"privfl: cannot write the shared data cache {path} ({exc}); this process keeps "
        "its own decoded copy",
        stacklevel=3,
    )
    return built


def _build(name: str, build: Callable[[], ImageSet]) -> ImageSet:
    _BUILDS[name] += 1
    return build()


def _pool_key(name: str, files: Sequence[Path]) -> str:
    key = hashlib.sha256(f"{_POOL_FORMAT}|{name}\n".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return key.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes, so one of them decodes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: racing builders each rename a complete file into place
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_pool(path: Path, key: str, data: ImageSet) -> None:
    """``data`` to ``path`` atomically: a header, then the images and the labels."""
    images = np.ascontiguousarray(data.images.numpy())
    labels = np.ascontiguousarray(data.labels.numpy())
    start = _POOL_ALIGN * 2  # room for the header
    labels_at = -(-(start + images.nbytes) // 64) * 64
    crc = zlib.crc32(memoryview(images).cast("B"))
    crc = zlib.crc32(bytes(labels_at - start - images.nbytes), crc)
    crc = zlib.crc32(memoryview(labels).cast("B"), crc)
    header = json.dumps(
        {
            "key": key,
            "images": [images.dtype.str, list(images.shape), start],
            "labels": [labels.dtype.str, list(labels.shape), labels_at],
            "size": labels_at + labels.nbytes,
            "crc32": crc,
        }
    ).encode()
    if len(_POOL_MAGIC) + 8 + len(header) > start:
        raise DataError(f"{path}: header too long ({len(header)} bytes)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_POOL_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(bytes(start - f.tell()))
            f.write(memoryview(images).cast("B"))
            f.write(bytes(labels_at - f.tell()))
            f.write(memoryview(labels).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


def _open_pool(path: Path, key: str) -> ImageSet | None:
    """The pool cached at ``path``, memory-mapped read-only; None if it is missing, was
    written for another key, or is truncated or corrupt (size and CRC-32 checked)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the mapping outlives it
    except OSError:
        return None
    with f:
        try:
            head = f.read(len(_POOL_MAGIC) + 8)
            if len(head) != len(_POOL_MAGIC) + 8 or not head.startswith(_POOL_MAGIC):
                return None
            header = json.loads(f.read(int.from_bytes(head[-8:], "little")))
            (im_dtype, im_shape, im_at), (lb_dtype, lb_shape, lb_at) = (
                header["images"],
                header["labels"],
            )
            if header["key"] != key or os.fstat(f.fileno()).st_size != header["size"]:
                return None
            f.seek(im_at)
            crc = 0
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
            if crc != header["crc32"] or not im_shape[0]:
                return None
            images = np.memmap(f, np.dtype(im_dtype), "r", im_at, tuple(im_shape))
            labels = np.memmap(f, np.dtype(lb_dtype), "r", lb_at, tuple(lb_shape))
        except (OSError, ValueError, TypeError, KeyError):
            return None
    out = ImageSet.__new__(ImageSet)
    # Checked when it was written; checking again would read every page of it.
    out._set(
        _read_only_tensor(np.asarray(images)),
        _read_only_tensor(np.asarray(labels)),
        None,
        (path, key),
    )
    return out


def _reopen_pool(path: Path, key: str) -> ImageSet:
    pool = _open_pool(path, key)
    if pool is None:
        raise DataError(f"{path}: the shared data cache is gone or corrupt; load the data again")
    return pool
