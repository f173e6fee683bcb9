"""Checkpoint payloads: JSON + safetensors round trips, determinism, and rejection of bad input."""

from __future__ import annotations

import math
import random
import struct
from collections import OrderedDict, namedtuple
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from nx46vx.errors import CheckpointError
from nx46vx.payload import pack, unpack


def roundtrip(obj: Any) -> Any:
    return unpack(*pack(obj))


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same(a: Any, b: Any) -> None:
    """Structural equality that also checks types, dtypes and bits (nan-safe)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert type(next(k for k in b if k == key)) is type(key)
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and b.device.type == "cpu"
        assert a.detach().contiguous().numpy().tobytes() == b.numpy().tobytes()
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.ascontiguousarray(a).tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert float_bits(a) == float_bits(b) or (math.isnan(a) and math.isnan(b))
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and (a.tobytes() == b.tobytes() or (np.isnan(a) and np.isnan(b)))
    else:
        assert a == b


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(n):
        x = torch.randn(8, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def make_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, sched


# --------------------------------------------------------------------------- realistic state


def test_adamw_and_scheduler_resume_bit_identical() -> None:
    model, opt, sched = make_training(0)
    train_steps(model, opt, sched, 2)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    restored = roundtrip(state)
    assert isinstance(restored["optimizer"]["state"], dict)
    assert sorted(restored["optimizer"]["state"]) == [0, 1]  # int keys keep their type
    assert_same(opt.state_dict()["state"], restored["optimizer"]["state"])

    # Reference: keep training the original for one step.
    train_steps(model, opt, sched, 1)
    expected = [p.detach().clone() for p in model.parameters()]

    # Resume: fresh objects, load the round-tripped state, take the same step.
    model2, opt2, sched2 = make_training(123)
    model2.load_state_dict(restored["model"])
    opt2.load_state_dict(restored["optimizer"])
    sched2.load_state_dict(restored["scheduler"])
    train_steps(model2, opt2, sched2, 1)
    for want, got in zip(expected, model2.parameters()):
        assert torch.equal(want.view(torch.int32), got.detach().view(torch.int32))
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_python_random_state_restores() -> None:
    random.seed(11)
    random.random()
    state = random.getstate()
    restored = roundtrip({"random": state})["random"]
    assert type(restored) is tuple and type(restored[1]) is tuple
    assert restored == state
    want = random.random()
    random.setstate(restored)
    assert random.random() == want


def test_numpy_random_state_restores() -> None:
    np.random.seed(5)
    np.random.rand(3)
    state = np.random.get_state()
    restored = roundtrip(state)
    assert type(restored) is tuple and restored[1].dtype == np.uint32
    assert_same(state, restored)
    want = np.random.rand(4)
    np.random.set_state(restored)
    assert np.array_equal(np.random.rand(4), want)


def test_torch_rng_state_restores() -> None:
    torch.manual_seed(9)
    state = torch.get_rng_state()
    want = torch.rand(5)
    restored = roundtrip({"torch": state})["torch"]
    assert restored.dtype == torch.uint8 and torch.equal(restored, state)
    torch.set_rng_state(restored)
    assert torch.equal(torch.rand(5), want)


# --------------------------------------------------------------------------- value types


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.0, 0.1, 5e-324, 1.7976931348623157e308, 1 / 3])
def test_floats_round_trip_bit_exact(value: float) -> None:
    assert_same([value], roundtrip([value]))


def test_nonfinite_floats_use_markers() -> None:
    json_bytes, _ = pack({"a": math.nan, "b": math.inf, "c": -math.inf})
    assert b"null" not in json_bytes
    out = roundtrip({"a": math.nan, "b": math.inf, "c": -math.inf})
    assert math.isnan(out["a"]) and out["b"] == math.inf and out["c"] == -math.inf


@pytest.mark.parametrize("value", [0, -1, 2**63 - 1, -(2**63), 2**63, 2**64, -(2**63) - 1, 3**200, -(7**5000)])
def test_ints_of_any_size(value: int) -> None:
    assert_same(value, roundtrip(value))


def test_int_key_dicts_and_tuples_vs_lists() -> None:
    obj = {
        "state": {0: {"step": 1}, 5: [1, 2], -3: (1, [2, (3,)])},
        "big": {2**70: "x"},
        "list": [1, (2, 3), [4]],
        "tuple": (),
        "empty": {},
        "nested": ((),),
    }
    out = roundtrip(obj)
    assert_same(obj, out)
    assert type(out["list"][1]) is tuple and type(out["list"][2]) is list


def test_reserved_looking_keys_round_trip() -> None:
    obj = {
        "a": {"__tensor__": "t0"},
        "b": {"__tuple__": [1, 2]},
        "c": {"__dict__": {"__x": 1}},
        "d": {"__": None},
        "e": {"__tensor__": "t0", "other": 1},
        "f": {"_single": 1},
    }
    _, tensor_bytes = pack(obj)
    assert unpack(*pack(obj)) == obj
    assert unpack(pack(obj)[0], tensor_bytes) == obj


def test_tensors_of_many_dtypes_and_shapes() -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    obj = {
        "u8": torch.arange(10, dtype=torch.uint8),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "f32": torch.randn(3, 2),
        "f64": base,
        "bool": torch.tensor([True, False, True]),
        "f16": torch.tensor([1.5, -0.0, float("nan")], dtype=torch.float16),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 5, dtype=torch.int32),
        "strided": base.transpose(0, 2)[::2],
        "grad": torch.ones(2, requires_grad=True) * 2,
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    out = roundtrip(obj)
    for key, value in obj.items():
        got = out[key]
        assert type(got) is torch.Tensor and got.dtype == value.dtype and got.shape == value.shape
        assert not got.requires_grad
        assert torch.equal(value.detach(), got) or key == "f16"
    assert out["f16"].view(torch.int16).tolist() == obj["f16"].view(torch.int16).tolist()
    assert out["strided"].is_contiguous()
    out["f32"] += 1  # writable and independent of the input
    assert not torch.equal(out["f32"], obj["f32"])


def test_numpy_arrays_keep_dtype_shape_and_bits() -> None:
    obj = {
        "u32": np.arange(624, dtype=np.uint32),
        "f16": np.array([0.5, np.nan, -np.inf], dtype=np.float16),
        "zero_d": np.array(7, dtype=np.int16),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "bool": np.array([[True], [False]]),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "empty": np.zeros((3, 0)),
    }
    out = roundtrip(obj)
    assert_same(obj, out)
    assert all(type(v) is np.ndarray for v in out.values())
    assert out["zero_d"].shape == ()


def test_big_endian_array_comes_back_native_with_same_values() -> None:
    arr = np.arange(5, dtype=">u4")
    out = roundtrip(arr)
    assert out.dtype == np.uint32 and out.dtype.isnative and np.array_equal(out, arr)


def test_numpy_scalars_keep_exact_type() -> None:
    obj = [np.float32(1.1), np.float64(np.nan), np.float16(-0.0), np.int64(-5), np.uint64(2**64 - 1), np.uint8(255), np.bool_(True), np.int32(7)]
    out = roundtrip(obj)
    assert_same(obj, out)


def test_tensor_and_ndarray_are_told_apart() -> None:
    out = roundtrip({"t": torch.ones(2), "n": np.ones(2, dtype=np.float32)})
    assert type(out["t"]) is torch.Tensor and type(out["n"]) is np.ndarray


def test_tensor_names_follow_traversal_order() -> None:
    json_bytes, _ = pack({"b": np.zeros(1), "a": [torch.zeros(1), np.ones(1)]})
    tree = orjson.loads(json_bytes)
    assert tree == {"a": [{"__tensor__": "t0"}, {"__ndarray__": "t1"}], "b": {"__ndarray__": "t2"}}


def test_no_tensors_gives_valid_empty_file() -> None:
    json_bytes, tensor_bytes = pack({"a": 1})
    assert tensor_bytes and unpack(json_bytes, tensor_bytes) == {"a": 1}
    assert roundtrip(None) is None and roundtrip("x") == "x"


def test_ordered_dict_comes_back_as_dict() -> None:
    out = roundtrip(OrderedDict([("w", torch.ones(1)), ("b", torch.zeros(1))]))
    assert type(out) is dict and set(out) == {"w", "b"}


# --------------------------------------------------------------------------- determinism


def test_pack_is_deterministic() -> None:
    def state(order: list[str]) -> dict[str, Any]:
        model, opt, sched = make_training(0)
        train_steps(model, opt, sched, 2)
        base = {"opt": opt.state_dict(), "rng": np.random.RandomState(3).get_state(), "f": math.nan, "s": {0: 1, 1: 2}}
        return {k: base[k] for k in order}

    first = pack(state(["opt", "rng", "f", "s"]))
    second = pack(state(["s", "f", "rng", "opt"]))
    assert first == second
    assert first == pack(state(["opt", "rng", "f", "s"]))


# --------------------------------------------------------------------------- rejected at pack


PickleOnly = namedtuple("PickleOnly", "a b")


class Custom:
    pass


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        ({"fista": {"y": {1, 2}}}, "state.fista.y"),
        ({"f": lambda x: x}, "state.f"),
        ([1, [2, b"bytes"]], "state[1][1]"),
        ({"c": Custom()}, "state.c"),
        ({"nt": PickleOnly(1, 2)}, "state.nt"),
        ({"z": 1 + 2j}, "state.z"),
        ({"k": {0: 1, "a": 2}}, "state.k"),
        ({"k": {(1, 2): 1}}, "state.k"),
        ({"k": {True: 1}}, "state.k"),
        ({"t": torch.zeros(2, dtype=torch.bfloat16)}, "state.t"),
        ({"a": np.array(["text"])}, "state.a"),
        ({"a": np.array([1], dtype=object)}, "state.a"),
        ({"s": np.str_("x")}, "state.s"),
        ({"m": np.ma.masked_array([1, 2])}, "state.m"),
        ({"sp": torch.eye(2).to_sparse()}, "state.sp"),
        ({"x": {"__tuple__": frozenset()}}, "state.x.__tuple__"),
    ],
)
def test_unsupported_types_raise_type_error_with_path(obj: Any, where: str) -> None:
    with pytest.raises(TypeError, match=rf"^{__import__('re').escape(where)}: "):
        pack(obj)


def test_circular_reference_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="circular"):
        pack({"loop": loop})


def test_shared_but_not_circular_containers_are_fine() -> None:
    shared = [1, 2]
    assert roundtrip({"a": shared, "b": shared}) == {"a": [1, 2], "b": [1, 2]}


# --------------------------------------------------------------------------- rejected at unpack


def good_payload() -> tuple[bytes, bytes]:
    return pack({"w": torch.ones(3), "n": np.zeros(2), "x": (1, 2.5)})


def assert_malformed(json_bytes: bytes, tensor_bytes: bytes) -> CheckpointError:
    with pytest.raises(CheckpointError, match="checkpoint payload is malformed") as info:
        unpack(json_bytes, tensor_bytes)
    assert info.value.expected is not None and info.value.found is not None
    return info.value


@pytest.mark.parametrize("bad_json", [b"", b"{not json", b"\xff\xfe", b'{"a": 1'])
def test_corrupted_json(bad_json: bytes) -> None:
    assert_malformed(bad_json, good_payload()[1])


def test_corrupted_json_flipped_byte() -> None:
    json_bytes, tensor_bytes = good_payload()
    assert_malformed(json_bytes[:-1], tensor_bytes)


@pytest.mark.parametrize("bad_tensors", [b"", b"garbage", b"\x08" + b"\x00" * 7 + b"{nope}  ", b"\xff" * 16])
def test_corrupted_safetensors(bad_tensors: bytes) -> None:
    assert_malformed(good_payload()[0], bad_tensors)


def test_truncated_safetensors() -> None:
    json_bytes, tensor_bytes = good_payload()
    assert_malformed(json_bytes, tensor_bytes[:-4])


def test_missing_tensor() -> None:
    json_bytes, _ = good_payload()
    _, no_tensors = pack({})
    error = assert_malformed(json_bytes, no_tensors)
    assert "t0" in str(error.found) or "t1" in str(error.found)


def test_unreferenced_or_duplicated_tensor() -> None:
    _, tensor_bytes = good_payload()
    assert_malformed(b'{"w": {"__tensor__": "t0"}}', tensor_bytes)
    assert_malformed(b'[{"__tensor__": "t0"}, {"__tensor__": "t0"}, {"__tensor__": "t1"}]', tensor_bytes)


@pytest.mark.parametrize(
    "tree",
    [
        {"__pickle__": "x"},
        {"__tensor__": 3},
        {"__tensor__": ["t0"]},
        {"__float__": "zero"},
        {"__float__": ["nan"]},
        {"__int__": "0x10"},
        {"__int__": 16},
        {"__tuple__": "abc"},
        {"__items__": [[1]]},
        {"__items__": [["a", 1]]},
        {"__items__": [[1, 1], [1, 2]]},
        {"__items__": {"1": 2}},
        {"__npscalar__": ["object", 1]},
        {"__npscalar__": [["float32"], 1.0]},
        {"__npscalar__": ["uint8", 300]},
        {"__npscalar__": ["float32", "1.0"]},
        {"__npscalar__": ["int64", True]},
        {"__dict__": [1]},
        {"a": [{"__unknown__": 1}]},
    ],
)
def test_bad_markers(tree: Any) -> None:
    assert_malformed(orjson.dumps(tree), pack({})[1])


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    depth = 500  # within orjson's limit, beyond Python's recursion limit when rebuilt
    assert_malformed(b'{"__tuple__":[' * depth + b"]}" * depth, pack({})[1])


def test_unpack_wants_bytes() -> None:
    with pytest.raises(TypeError):
        unpack("{}", pack({})[1])  # type: ignore[arg-type]
