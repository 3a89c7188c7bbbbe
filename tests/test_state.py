"""The tensor state codec: round trips, the wire form, and refusals."""

from __future__ import annotations

import struct

import cbor2
import pytest
import torch
from hypothesis import given

from plan_runtime.state import (
    StateError,
    decode_message,
    decode_state,
    encode_state,
    load_views,
)
from tests.strategies import cbor_values, states, tensors


def _document(value: object, name: str = "w") -> bytes:
    return cbor2.dumps(
        {
            "format": "nimble-edge/state",
            "version": 1,
            "tensors": [{"name": name, "value": value}],
        }
    )


@given(states())
def test_state_round_trips_names_order_dtypes_and_values(state):
    decoded = decode_state(encode_state(state))

    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype
        assert decoded[name].shape == tensor.shape
        assert torch.equal(decoded[name], tensor)


@given(tensors())
def test_zero_copy_decoding_gives_the_same_values(tensor):
    decoded = decode_state(encode_state([tensor]), copy=False)["0"]

    assert torch.equal(decoded, tensor)


@given(states())
def test_every_tensor_is_aligned_and_decoded_in_place(state):
    # A bytearray's buffer is 16-aligned, as the server's body buffer is.
    document = bytearray(encode_state(state))
    start = torch.frombuffer(document, dtype=torch.uint8).data_ptr()

    decoded = decode_state(document, copy=False)

    for name, tensor in decoded.items():
        if tensor.numel():
            offset = tensor.data_ptr() - start
            assert 0 <= offset < len(document), f"{name!r} was copied"
            assert offset % 8 == 0
        assert torch.equal(tensor, state[name])
    tensors = cbor2.loads(bytes(document))["tensors"]
    assert [entry["name"] for entry in tensors] == list(state)


def test_list_state_is_named_by_position():
    decoded = decode_state(encode_state([torch.ones(2), torch.zeros(3)]))

    assert list(decoded) == ["0", "1"]


def test_float32_uses_rfc8746_tag_85_inside_tag_40():
    data = encode_state({"w": torch.tensor([[1.0, 2.0]])})

    value = cbor2.loads(data)["tensors"][0]["value"]

    assert value.tag == 40
    dims, array = value.value
    assert list(dims) == [1, 2]
    assert array.tag == 85
    assert array.value == struct.pack("<2f", 1.0, 2.0)


def test_bool_uses_the_named_form():
    data = encode_state({"mask": torch.tensor([True, False])})

    value = cbor2.loads(data)["tensors"][0]["value"]

    assert value == {"dtype": "bool", "shape": [2], "data": b"\x01\x00"}


def test_nan_and_infinity_survive_the_round_trip():
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5])

    decoded = decode_state(encode_state([tensor]))["0"]

    assert torch.equal(decoded.isnan(), tensor.isnan())
    assert torch.equal(decoded[1:], tensor[1:])


def test_big_endian_arrays_from_other_clients_are_read():
    value = cbor2.CBORTag(40, [[2], cbor2.CBORTag(81, struct.pack(">2f", 1.5, -2.0))])

    decoded = decode_state(_document(value))["w"]

    assert decoded.tolist() == [1.5, -2.0]


def test_shape_claiming_more_elements_than_bytes_is_refused():
    value = cbor2.CBORTag(40, [[10**6, 10**6], cbor2.CBORTag(85, b"\x00" * 8)])

    with pytest.raises(StateError, match="needs 4000000000000 bytes; got 8"):
        decode_state(_document(value))


def test_negative_dimension_is_refused():
    value = cbor2.CBORTag(40, [[-2], cbor2.CBORTag(85, b"\x00" * 8)])

    with pytest.raises(StateError, match="integers from 0 to"):
        decode_state(_document(value))


def test_duplicate_names_are_refused():
    value = cbor2.CBORTag(40, [[1], cbor2.CBORTag(85, b"\x00" * 4)])
    data = cbor2.dumps(
        {
            "format": "nimble-edge/state",
            "version": 1,
            "tensors": [{"name": "a", "value": value}, {"name": "a", "value": value}],
        }
    )

    with pytest.raises(StateError, match="appears twice"):
        decode_state(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "only 0 remain"),
        (b"\xa1", "only 0 remain"),
        (cbor2.dumps([1, 2]), "must be a map"),
        (cbor2.dumps({"format": "other", "version": 1}), '"format" must be'),
        (cbor2.dumps({"format": "nimble-edge/state", "version": 9}), "not supported"),
        (cbor2.dumps({"format": "nimble-edge/state", "version": 1}), '"tensors"'),
    ],
)
def test_malformed_documents_are_refused_with_a_reason(data, message):
    with pytest.raises(StateError, match=message):
        decode_state(data)


def test_other_cbor_tags_are_refused_in_state_documents():
    with pytest.raises(StateError, match="tag"):
        decode_state(_document(cbor2.CBORTag(35, "a+")))


def test_messages_refuse_every_tag():
    for tag in (0, 1, 2, 28, 29, 35, 40, 85, 9999):
        with pytest.raises(StateError):
            decode_message(cbor2.dumps({"x": cbor2.CBORTag(tag, b"\x01")}))


def test_deep_nesting_is_refused_without_recursion_error():
    data = b"\x81" * 5000 + b"\x00"

    with pytest.raises(StateError):
        decode_message(data)


def test_state_error_is_also_a_value_error():
    assert issubclass(StateError, ValueError)


def test_complex_tensors_have_no_wire_form():
    with pytest.raises(StateError, match="no wire form"):
        encode_state([torch.zeros(2, dtype=torch.complex64)])


def test_dimensions_that_would_overflow_are_refused_even_when_empty():
    value = cbor2.CBORTag(40, [[0, 2**63], cbor2.CBORTag(85, b"")])

    with pytest.raises(StateError, match="integers from 0 to"):
        decode_state(_document(value))


def test_bytes_after_the_document_are_refused():
    with pytest.raises(StateError, match="follow the CBOR document"):
        decode_state(encode_state([torch.ones(2)]) + b"junk")


def test_empty_tensor_names_are_refused():
    with pytest.raises(StateError, match="non-empty name"):
        decode_state(encode_state({"": torch.ones(1)}))


def test_item_budget_is_checked_before_decoding():
    many = cbor2.dumps(
        {"format": "nimble-edge/state", "version": 1, "tensors": [0] * 10_000}
    )

    with pytest.raises(StateError, match="more than"):
        decode_state(many, max_tensors=2)


def _plain(value):
    """Views as bytes, NaN as a marker, so that decoded values compare with ==."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@given(cbor_values)
def test_view_reader_reads_what_cbor2_writes(value):
    data = cbor2.dumps(value)
    try:
        expected = cbor2.loads(data)
    except Exception:  # cbor2 cannot read back some of its own maps
        return

    try:
        got = load_views(data, max_items=10_000)
    except StateError as exc:
        # Only integers beyond 64 bits (bignum tags) may be refused.
        assert "tag 2" in str(exc) or "tag 3" in str(exc)
        return

    assert _plain(got) == _plain(expected)


def test_view_reader_keeps_byte_strings_as_views_of_the_buffer():
    data = bytearray(cbor2.dumps({"diff": b"x" * 1000}))

    view = load_views(data)["diff"]
    data[-1:] = b"y"

    assert isinstance(view, memoryview) and bytes(view[-1:]) == b"y"
