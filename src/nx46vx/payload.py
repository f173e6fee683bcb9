"""Checkpoint payloads as JSON plus safetensors: tensors and plain data, never pickle.

A checkpoint folder may come from anywhere (a Kaggle dataset attached to the
notebook, a colleague's run, a half-written disk), so its bytes are untrusted.
``torch.load`` and ``pickle`` execute code from the file they read; this module
does not. :func:`pack` splits a nested training state into two byte strings:

* a JSON document (written by ``orjson`` with sorted keys, so the same state
  always gives the same bytes and checkpoint hashes are stable) holding the
  structure and every scalar, and
* a safetensors file holding every array, named ``t0``, ``t1``, ... in
  traversal order.

:func:`unpack` reverses it and rejects anything malformed with a
:class:`~nx46vx.errors.CheckpointError`. Only the types listed in :func:`pack`
are accepted; anything else is refused when packing rather than silently lost.

Values that JSON cannot express are written as one-key marker objects::

    {"__tensor__": "t3"}              torch.Tensor stored as safetensors entry t3
    {"__ndarray__": "t4"}             numpy.ndarray stored as safetensors entry t4
    {"__tuple__": [...]}              tuple
    {"__float__": "nan"}              nan, inf or -inf
    {"__int__": "-1f..."}             int outside the signed 64-bit range (hex)
    {"__items__": [[k, v], ...]}      dict with int keys
    {"__npscalar__": ["float32", v]}  numpy scalar
    {"__dict__": {...}}               a user dict whose only key starts with "__"
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import orjson
import safetensors.numpy
import torch

from nx46vx.errors import CheckpointError

__all__ = ["pack", "unpack"]

#: numpy dtypes that travel through the safetensors file (and numpy scalar types accepted).
DTYPES = frozenset(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64", "complex64"]
)
_SCALAR_DTYPES = DTYPES - {"complex64"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_HEX_INT = re.compile(r"-?[0-9a-f]+")
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__float__", "__int__", "__items__", "__npscalar__", "__dict__")


# --------------------------------------------------------------------------- pack


class _Packer:
    """Turn a nested object into JSON-ready data, collecting arrays on the way."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._active: set[int] = set()  # ids of the containers on the current path

    def encode(self, obj: Any, path: str) -> Any:
        kind = type(obj)
        if obj is None or kind is bool or kind is str:
            return obj
        if kind is int:
            return obj if _INT64_MIN <= obj <= _INT64_MAX else {"__int__": format(obj, "x")}
        if kind is float:
            if math.isfinite(obj):
                return obj
            return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if kind in (dict, OrderedDict, list, tuple):
            return self._container(obj, path)
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._store(_torch_to_numpy(obj, path), path)}
        if kind is np.ndarray or isinstance(obj, np.memmap):
            return {"__ndarray__": self._store(obj, path)}
        if isinstance(obj, np.generic):
            return self._npscalar(obj, path)
        raise TypeError(f"{path}: cannot store {kind.__module__}.{kind.__qualname__} in a checkpoint (no pickle)")

    def _container(self, obj: dict[Any, Any] | list[Any] | tuple[Any, ...], path: str) -> Any:
        if id(obj) in self._active:
            raise ValueError(f"{path}: circular reference, cannot store in a checkpoint")
        self._active.add(id(obj))
        try:
            if isinstance(obj, dict):
                return self._dict(obj, path)
            items = [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
            return {"__tuple__": items} if isinstance(obj, tuple) else items
        finally:
            self._active.discard(id(obj))

    def _dict(self, obj: dict[Any, Any], path: str) -> Any:
        kinds = {type(k) for k in obj}
        if kinds <= {str}:
            out = {k: self.encode(obj[k], f"{path}.{k}") for k in sorted(obj)}
            if len(out) == 1 and next(iter(out)).startswith("__"):
                return {"__dict__": out}
            return out
        if kinds == {int}:
            items = [[self.encode(k, path), self.encode(obj[k], f"{path}[{k}]")] for k in sorted(obj)]
            return {"__items__": items}
        names = sorted(t.__name__ for t in kinds)
        raise TypeError(f"{path}: dict keys must be all str or all int, found {', '.join(names)}")

    def _store(self, array: np.ndarray, path: str) -> str:
        array = np.asarray(array)
        if array.dtype.name not in DTYPES or array.dtype.fields is not None:
            raise TypeError(f"{path}: arrays of dtype {array.dtype} cannot be stored in a checkpoint")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        name = f"t{len(self.arrays)}"
        self.arrays[name] = array
        return name

    def _npscalar(self, obj: np.generic, path: str) -> dict[str, Any]:
        name = obj.dtype.name
        if name not in _SCALAR_DTYPES:
            raise TypeError(f"{path}: numpy scalars of dtype {obj.dtype} cannot be stored in a checkpoint")
        return {"__npscalar__": [name, self.encode(obj.item(), path)]}


def _torch_to_numpy(tensor: torch.Tensor, path: str) -> np.ndarray:
    """A CPU, contiguous numpy copy of ``tensor`` (TypeError for layouts or dtypes numpy lacks)."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise TypeError(f"{path}: only dense tensors can be stored in a checkpoint, found {tensor.layout} on {tensor.device}")
    try:
        return tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().numpy()
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{path}: tensors of dtype {tensor.dtype} cannot be stored in a checkpoint ({exc})") from None


def pack(obj: Any) -> tuple[bytes, bytes]:
    """Split a nested state into (JSON bytes, safetensors bytes).

    Parameters
    ----------
    obj : Any
        Built, recursively, from: ``dict`` (or ``OrderedDict``, which comes
        back as ``dict``) with all-``str`` or all-``int`` keys, ``list``,
        ``tuple``, ``str``, ``int`` (any size), ``float`` (including nan and
        ±inf), ``bool``, ``None``, dense ``torch.Tensor`` and
        ``numpy.ndarray`` (dtypes in :data:`DTYPES`), and numpy scalars of
        those dtypes except complex64. Subclasses of the builtins (namedtuple,
        defaultdict, ``str``/``int``/``float`` subclasses) are refused rather
        than silently losing their type; ``torch.nn.Parameter`` is stored as a
        plain tensor.

    Returns
    -------
    json_bytes : bytes
        The structure and scalars; deterministic (sorted keys).
    tensor_bytes : bytes
        A safetensors file holding the arrays (a valid, empty file when there are none).

    Raises
    ------
    TypeError
        For any other type, dtype or key type; the message names the path
        inside ``obj`` (e.g. ``state.fista.y``).
    ValueError
        For a container that contains itself.
    """
    packer = _Packer()
    tree = packer.encode(obj, "state")
    try:
        json_bytes = orjson.dumps(tree, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # nesting too deep, or a str with lone surrogates
        raise TypeError(f"state: cannot be written as JSON ({exc})") from None
    return json_bytes, safetensors.numpy.save(packer.arrays)


# --------------------------------------------------------------------------- unpack


def _malformed(expected: Any, found: Any) -> CheckpointError:
    return CheckpointError("checkpoint payload is malformed", expected=expected, found=found)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Unpacker:
    """Rebuild the object from parsed JSON and the loaded arrays; every name must be used once."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.used: set[str] = set()

    def decode(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node  # str, int, float, bool, None
        if len(node) == 1:
            key = next(iter(node))
            if key.startswith("__"):
                return self._marker(key, node[key])
        return {k: self.decode(v) for k, v in node.items()}

    def _marker(self, key: str, value: Any) -> Any:
        if key in ("__tensor__", "__ndarray__"):
            array = self._take(value)
            return torch.from_numpy(array) if key == "__tensor__" else array
        if key == "__tuple__" and isinstance(value, list):
            return tuple(self.decode(v) for v in value)
        if key == "__float__" and isinstance(value, str) and value in _NONFINITE:
            return _NONFINITE[value]
        if key == "__int__" and isinstance(value, str) and _HEX_INT.fullmatch(value):
            return int(value, 16)
        if key == "__items__" and isinstance(value, list):
            return self._items(value)
        if key == "__npscalar__":
            return self._npscalar(value)
        if key == "__dict__" and isinstance(value, dict):
            return {k: self.decode(v) for k, v in value.items()}
        if key in _MARKERS:
            raise _malformed(f"a valid {key} marker", _short({key: value}))
        raise _malformed(f"one of the markers {', '.join(_MARKERS)}", _short(key))

    def _take(self, name: Any) -> np.ndarray:
        if not isinstance(name, str) or name not in self.arrays:
            raise _malformed("a tensor name present in the safetensors file", _short(name))
        if name in self.used:
            raise _malformed("each tensor referenced once", f"{name} referenced twice")
        self.used.add(name)
        array = self.arrays[name]
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = array.copy(order="C")
        return array

    def _items(self, value: list[Any]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for pair in value:
            if not isinstance(pair, list) or len(pair) != 2:
                raise _malformed("[key, value] pairs in __items__", _short(pair))
            key = self.decode(pair[0])
            if type(key) is not int or key in out:
                raise _malformed("distinct int keys in __items__", _short(pair[0]))
            out[key] = self.decode(pair[1])
        return out

    def _npscalar(self, value: Any) -> np.generic:
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in _SCALAR_DTYPES):
            raise _malformed("__npscalar__ as [dtype, value]", _short(value))
        dtype, item = np.dtype(value[0]), self.decode(value[1])
        want = {"b": (bool,), "i": (int,), "u": (int,), "f": (float,)}[dtype.kind]
        if type(item) not in want:
            raise _malformed(f"a {want[0].__name__} value for numpy {dtype}", _short(item))
        if dtype.kind in "iu" and not np.iinfo(dtype).min <= item <= np.iinfo(dtype).max:
            raise _malformed(f"a value that fits numpy {dtype}", _short(item))
        return dtype.type(item)


def _load_arrays(tensor_bytes: bytes) -> dict[str, np.ndarray]:
    try:
        arrays = safetensors.numpy.load(bytes(tensor_bytes))
    except Exception as exc:  # the Rust reader raises SafetensorError, others on odd headers
        raise _malformed("a safetensors file", f"{type(exc).__name__}: {exc}") from None
    for name, array in arrays.items():
        if array.dtype.name not in DTYPES:
            raise _malformed(f"tensor dtypes among {sorted(DTYPES)}", f"{name}: {array.dtype}")
    return arrays


def unpack(json_bytes: bytes, tensor_bytes: bytes) -> Any:
    """Inverse of :func:`pack`.

    Parameters
    ----------
    json_bytes : bytes
        The first output of :func:`pack`.
    tensor_bytes : bytes
        The second output of :func:`pack`.

    Returns
    -------
    Any
        The packed object: tuples as tuples, int-key dicts with int keys,
        tensors as CPU ``torch.Tensor`` and arrays as ``numpy.ndarray`` (both
        writable, with the original dtype, shape and bits). Dict keys come
        back in sorted order.

    Raises
    ------
    CheckpointError
        ``"checkpoint payload is malformed"`` with ``expected=`` and ``found=``
        for bytes that are not JSON, a bad safetensors file, an unknown or
        invalid marker, a missing, duplicated or unreferenced tensor name.
    TypeError
        If an argument is not bytes-like.
    """
    for arg in (json_bytes, tensor_bytes):
        if not isinstance(arg, (bytes, bytearray, memoryview)):
            raise TypeError(f"unpack takes bytes, got {type(arg).__name__}")
    try:
        tree = orjson.loads(json_bytes)
    except orjson.JSONDecodeError as exc:
        raise _malformed("JSON", str(exc)) from None
    unpacker = _Unpacker(_load_arrays(tensor_bytes))
    try:
        obj = unpacker.decode(tree)
    except RecursionError:
        raise _malformed("nesting that Python can rebuild", "too deeply nested JSON") from None
    unused = sorted(set(unpacker.arrays) - unpacker.used)
    if unused:
        raise _malformed("every tensor referenced by the JSON", f"unreferenced {_short(unused)}")
    return obj
