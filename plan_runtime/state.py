"""The tensor state codec: model states, checkpoints and diffs as CBOR.

A state is one CBOR document that any CBOR library can read::

    {"format": "nimble-edge/state", "version": 1,
     "tensors": [{"name": "fc1.weight", "value": 40([[392, 784], 85(h'...')])}]}

Values use RFC 8746 typed arrays (tag 40 around the dimensions and a typed
array tag), little endian on the wire. Dtypes that RFC 8746 lacks (bool,
bfloat16) are written as ``{"dtype": ..., "shape": ..., "data": bytes}``.

The decoder checks every byte length against the claimed shape before it
creates a tensor, so a document cannot make it allocate more than it holds,
and it maps the received bytes into tensors without copying where alignment
allows.
"""

from __future__ import annotations

import ctypes
import math
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cbor2
import torch

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "StateError",
    "count_items",
    "decode_message",
    "decode_state",
    "decode_tensor",
    "encode_state",
    "encode_tensor",
    "layout_state",
    "load_views",
    "state_spec",
]

STATE_FORMAT = "nimble-edge/state"
STATE_VERSION = 1

# Deep enough for a state document (map, list, map, tag, list, tag) with room
# to spare; far below what would exhaust the C stack.
MAX_DEPTH = 24
MAX_DIMS = 32
# No dimension or element count above 2**40: far beyond any real model, and
# small enough that shape arithmetic never overflows in torch.
MAX_ELEMENTS = 2**40
MAX_ITEMS = 50_000_000

# RFC 8746 typed-array tags: little-endian tags are written, both are read.
_TAG_BY_DTYPE: dict[torch.dtype, int] = {
    torch.uint8: 64,
    torch.int8: 72,
    torch.int16: 77,
    torch.int32: 78,
    torch.int64: 79,
    torch.float16: 84,
    torch.float32: 85,
    torch.float64: 86,
}
_LITTLE_TAGS: dict[int, torch.dtype] = {tag: d for d, tag in _TAG_BY_DTYPE.items()}
_BIG_TAGS: dict[int, torch.dtype] = {
    73: torch.int16,
    74: torch.int32,
    75: torch.int64,
    80: torch.float16,
    81: torch.float32,
    82: torch.float64,
}
# The explicit form, for dtypes that RFC 8746 has no tag for.
_NAMED_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "bool",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

# Tags that cbor2 decodes into Python objects on its own (dates, bignums,
# regular expressions, shared references...). Untrusted documents get none.
_NATIVE_TAGS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52)
_NATIVE_TAGS += (54, 100, 256, 258, 260, 261, 1004, 55799)


class StateError(ValueError):
    """A state document is malformed or does not match what was expected."""


class _RawArray:
    """A typed array kept as bytes until the enclosing tag 40 gives its shape."""

    __slots__ = ("data", "dtype", "is_big_endian")

    def __init__(
        self, data: bytes | memoryview, dtype: torch.dtype, is_big_endian: bool
    ):
        self.data = data
        self.dtype = dtype
        self.is_big_endian = is_big_endian


class _NdArray:
    __slots__ = ("array", "shape")

    def __init__(self, shape: Any, array: Any):
        self.shape = shape
        self.array = array


def _refuse_tag(tag: Any, immutable: bool) -> Any:
    number = getattr(tag, "tag", tag)
    raise StateError(f"CBOR tag {number} is not allowed here")


def _refuse_native(value: Any, immutable: bool) -> Any:
    raise StateError("CBOR tags other than RFC 8746 arrays are not allowed here")


def _typed_array_decoder(dtype: torch.dtype, is_big_endian: bool) -> Any:
    def decode(value: Any, immutable: bool) -> _RawArray:
        if not isinstance(value, bytes):
            raise StateError(
                f"a typed array must hold a byte string; got {type(value).__name__}"
            )
        return _RawArray(value, dtype, is_big_endian)

    return decode


def _nd_array(value: Any, immutable: bool) -> _NdArray:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise StateError("tag 40 must hold [dimensions, typed array]")
    return _NdArray(value[0], value[1])


_STATE_DECODERS: dict[int, Any] = {tag: _refuse_native for tag in _NATIVE_TAGS}
_STATE_DECODERS[40] = _nd_array
for _tag, _dtype in _LITTLE_TAGS.items():
    _STATE_DECODERS[_tag] = _typed_array_decoder(_dtype, False)
for _tag, _dtype in _BIG_TAGS.items():
    _STATE_DECODERS[_tag] = _typed_array_decoder(_dtype, True)
_MESSAGE_DECODERS: dict[int, Any] = {tag: _refuse_native for tag in _NATIVE_TAGS}


def decode_message(
    data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int | None = 4096
) -> Any:
    """Decode an untrusted control message that may use no CBOR tags at all.

    Args:
        data: the message's bytes.
        max_depth: the deepest nesting accepted.
        max_items: the most data items accepted (None: no limit); checked
            before anything is decoded.

    Raises:
        StateError: the bytes are not one well-formed, tag-free CBOR item, or
            hold more items than allowed.
    """
    return _loads(data, _MESSAGE_DECODERS, max_depth, max_items)


def count_items(data: bytes | bytearray | memoryview, max_items: int) -> int:
    """Count the data items of one CBOR document without decoding it; return
    the offset where the document ends.

    Decoding turns every item into a Python object of 30 bytes or more, so a
    document of a million one-byte integers would cost far more memory than
    its size. Counting first bounds that: the walk reads only item headers,
    skips string contents, and stops after ``max_items`` items.

    Raises:
        StateError: the document holds more than ``max_items`` items, uses
            an indefinite length or a reserved header, or is followed by
            more bytes.
    """
    position, length = 0, len(data)
    pending, items = 1, 0
    while pending and position < length:
        initial = data[position]
        major, info = initial >> 5, initial & 31
        position += 1
        if info < 24:
            value = info
        elif info <= 27:
            size = 1 << (info - 24)
            value = int.from_bytes(data[position : position + size], "big")
            position += size
        else:
            raise StateError(
                f"indefinite or reserved CBOR header 0x{initial:02x} at byte "
                f"{position - 1}"
            )

        pending -= 1
        items += 1
        if items > max_items:
            raise StateError(f"document holds more than {max_items} CBOR items")
        if major in (2, 3):
            position += value
        elif major == 4:
            pending += value
        elif major == 5:
            pending += 2 * value
        elif major == 6:
            pending += 1
    if not pending and position < length:
        raise StateError(
            f"{length - position} bytes follow the CBOR document; send exactly one"
        )
    return items


def _loads(
    data: bytes,
    decoders: Mapping[int, Any],
    max_depth: int,
    max_items: int | None = None,
) -> Any:
    # Always walked: it also finds bytes trailing the document, which cbor2
    # would silently ignore.
    count_items(data, max_items if max_items is not None else MAX_ITEMS)
    try:
        return cbor2.loads(
            data,
            semantic_decoders=decoders,
            tag_hook=_refuse_tag,
            max_depth=max_depth,
            allow_indefinite=False,
        )
    except StateError:
        raise
    except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, StateError):
            raise StateError(str(cause)) from exc
        raise StateError(f"not a well-formed CBOR document: {exc}") from exc
    except RecursionError as exc:
        raise StateError(f"CBOR nested deeper than {max_depth} levels") from exc


class _ViewReader:
    """A strict CBOR reader that hands out byte strings as views, not copies.

    cbor2 copies every byte string into a new ``bytes`` object; for a diff of
    40 MB that is a copy per level of nesting. This reader keeps byte strings
    (and RFC 8746 typed arrays) as ``memoryview`` slices of the buffer it was
    given, so tensors can map the received bytes directly. It reads only
    what state documents and report bodies use: integers, floats, true,
    false, null, strings, arrays, maps with string or integer keys, and (when
    ``arrays`` is set) tag 40 around typed arrays. Lengths are checked
    against the bytes that remain before anything is built.
    """

    def __init__(self, data: bytes | bytearray | memoryview, *, arrays: bool):
        self.view = memoryview(data).cast("B")
        self.position = 0
        self.arrays = arrays

    def _take(self, size: int) -> memoryview:
        end = self.position + size
        if end > len(self.view):
            raise StateError(
                f"CBOR item claims {size} bytes at byte {self.position}; only "
                f"{len(self.view) - self.position} remain"
            )
        chunk = self.view[self.position : end]
        self.position = end
        return chunk

    def _header(self) -> tuple[int, int, int]:
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 31
        if info < 24:
            return major, info, info
        if info <= 27:
            return major, info, int.from_bytes(self._take(1 << (info - 24)), "big")
        raise StateError(f"indefinite or reserved CBOR header 0x{initial:02x}")

    def item(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise StateError(f"CBOR nested deeper than {MAX_DEPTH} levels")
        major, info, value = self._header()
        if major == 0:
            return value
        if major == 1:
            return -1 - value
        if major == 2:
            return self._take(value)
        if major == 3:
            try:
                return str(self._take(value), "utf-8")
            except UnicodeDecodeError as exc:
                raise StateError(f"CBOR text is not UTF-8: {exc}") from exc
        if major == 4:
            return [self.item(depth + 1) for _ in range(value)]
        if major == 5:
            return self._map(value, depth)
        if major == 6:
            return self._tag(value, depth)
        return self._simple(info, value)

    def _map(self, size: int, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for _ in range(size):
            key = self.item(depth + 1)
            if not isinstance(key, (str, int)):
                raise StateError(f"map keys must be strings; got {type(key).__name__}")
            if key in result:
                raise StateError(f"map key {key!r:.40} appears twice")
            result[key] = self.item(depth + 1)
        return result

    def _tag(self, tag: int, depth: int) -> Any:
        content = self.item(depth + 1)
        if self.arrays and tag == 40:
            return _nd_array(content, False)
        if self.arrays and (tag in _LITTLE_TAGS or tag in _BIG_TAGS):
            if not isinstance(content, memoryview):
                raise StateError(f"typed array tag {tag} must hold a byte string")
            dtype = _LITTLE_TAGS.get(tag) or _BIG_TAGS[tag]
            return _RawArray(content, dtype, tag in _BIG_TAGS)
        raise StateError(f"CBOR tag {tag} is not allowed here")

    @staticmethod
    def _simple(info: int, value: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            return struct.unpack(">e", value.to_bytes(2, "big"))[0]
        if info == 26:
            return struct.unpack(">f", value.to_bytes(4, "big"))[0]
        if info == 27:
            return struct.unpack(">d", value.to_bytes(8, "big"))[0]
        raise StateError(f"CBOR simple value {value} is not allowed here")


def load_views(
    data: bytes | bytearray | memoryview,
    *,
    max_items: int = 4096,
    arrays: bool = False,
) -> Any:
    """Decode one CBOR document, keeping byte strings as views of ``data``.

    The item budget and trailing bytes are checked first, as by
    :func:`count_items`. The views keep ``data`` alive; do not change it
    while they are in use.

    Raises:
        StateError: the document is malformed, too large in items, nested
            too deeply, or uses a tag or simple value it may not.
    """
    count_items(data, max_items)
    return _ViewReader(data, arrays=arrays).item()


# ---------------------------------------------------------------- encoding


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return b""
    if sys.byteorder == "big" and tensor.element_size() > 1:
        tensor = tensor.view(torch.uint8).reshape(-1, tensor.element_size())
        tensor = tensor.flip(1).contiguous()
    return ctypes.string_at(tensor.data_ptr(), nbytes)


def encode_tensor(tensor: torch.Tensor) -> Any:
    """Return the CBOR-ready value for one tensor (tag 40, or the named form).

    Raises:
        StateError: the dtype has no wire form (complex, quantized, ...).
    """
    shape = list(tensor.shape)
    tag = _TAG_BY_DTYPE.get(tensor.dtype)
    if tag is not None:
        return cbor2.CBORTag(40, [shape, cbor2.CBORTag(tag, _tensor_bytes(tensor))])

    name = DTYPE_NAMES.get(tensor.dtype)
    if name not in _NAMED_DTYPES:
        raise StateError(
            f"dtype {tensor.dtype} has no wire form; expected one of "
            f"{', '.join(sorted(DTYPES_BY_NAME))}"
        )
    return {"dtype": name, "shape": shape, "data": _tensor_bytes(tensor)}


def _named_tensors(
    state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(state, Mapping):
        return state.items()
    return ((str(i), t) for i, t in enumerate(state))


def encode_state(state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> bytes:
    """Encode named tensors (a state dict) or a list of tensors as one document.

    A list gets the names ``"0"``, ``"1"``, ... in its order. Each tensor's
    bytes start at a multiple of 8 from the document's start (see
    :func:`layout_state`), so that a receiver can map them in place.

    Raises:
        StateError: a value is not a tensor, or has a dtype with no wire form.
    """
    named = []
    for name, tensor in _named_tensors(state):
        if not isinstance(tensor, torch.Tensor):
            raise StateError(
                f"state entry {name!r} must be a tensor; got {type(tensor).__name__}"
            )
        named.append((str(name), tensor.detach()))
    if sys.byteorder != "little":
        tensors = [{"name": n, "value": encode_tensor(t)} for n, t in named]
        document = {"format": STATE_FORMAT, "version": STATE_VERSION}
        return cbor2.dumps({**document, "tensors": tensors})

    buffer, views = layout_state([(n, t.dtype, tuple(t.shape)) for n, t in named])
    for name, tensor in named:
        views[name].copy_(tensor)
    return bytes(buffer)


# Every tensor's bytes start at a multiple of this from the document's start:
# enough for any dtype, so that decoding maps them instead of copying.
ALIGN_BYTES = 8

# The argument widths a CBOR head may have after its first byte, and the
# additional information that announces each width.
_WIDTHS = (0, 1, 2, 4, 8)
_WIDTH_INFO = {1: 24, 2: 25, 4: 26, 8: 27}

# Padding for each remainder: extra bytes given to the heads of a tensor's
# entry map, its "name" key and its "value" key (each 1 byte at its
# shortest, so 1, 2 or 4 more are possible), in that order.
_PADDING = {
    0: (0, 0, 0),
    1: (1, 0, 0),
    2: (2, 0, 0),
    3: (1, 2, 0),
    4: (4, 0, 0),
    5: (1, 4, 0),
    6: (2, 4, 0),
    7: (1, 2, 4),
}


def _head(major: int, value: int, extra: int = 0) -> bytes:
    """A CBOR item header: the shortest form, or ``extra`` (1, 2, 4) bytes longer.

    A head longer than needed is valid CBOR (RFC 8949 prefers the shortest,
    and decoders read every form); :func:`layout_state` pads with it. Only a
    head whose shortest form is one byte (an argument below 24) is padded.
    """
    if extra:
        assert value < 24 and extra in (1, 2, 4), "only one-byte heads are padded"
        return bytes([major << 5 | _WIDTH_INFO[extra]]) + value.to_bytes(extra, "big")
    width = next((w for w in _WIDTHS if value < (24 if w == 0 else 1 << 8 * w)), -1)
    if width < 0:
        raise StateError(f"CBOR argument {value} does not fit in 64 bits")
    if width == 0:
        return bytes([major << 5 | value])
    return bytes([major << 5 | _WIDTH_INFO[width]]) + value.to_bytes(width, "big")


def layout_state(
    spec: Sequence[tuple[str, torch.dtype, Sequence[int]]],
) -> tuple[bytearray, dict[str, torch.Tensor]]:
    """Lay out a state document for ``spec`` and hand out its tensors to fill.

    Returns the whole document in one buffer and, per name, a tensor that
    is a view of that tensor's bytes inside it: whatever is written into
    the views (``torch.sub(a, b, out=view)``) is the encoded document,
    without building the tensors first and copying them in. The buffer
    must outlive the views. Little-endian hosts only (every current one);
    :func:`encode_state` works everywhere.

    Each tensor's bytes start at a multiple of :data:`ALIGN_BYTES` from the
    document's start: where needed, the small heads of its entry are
    written longer than their shortest form.

    Raises:
        StateError: a dtype has no wire form.
    """
    assert sys.byteorder == "little", "layout_state writes little-endian bytes"
    # The document's map has three entries; the first two are small, the
    # third is the list of tensors, whose byte strings are left to fill.
    first = cbor2.dumps({"format": STATE_FORMAT, "version": STATE_VERSION})
    head = _head(5, 3) + first[1:] + cbor2.dumps("tensors") + _head(4, len(spec))
    parts: list[bytes | int] = [head]
    position = len(head)
    for name, dtype, shape in spec:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        tag = _TAG_BY_DTYPE.get(dtype)
        if tag is not None:
            value = _head(6, 40) + _head(4, 2) + cbor2.dumps(list(shape))
            value += _head(6, tag)
        elif DTYPE_NAMES.get(dtype) in _NAMED_DTYPES:
            value = _head(5, 3) + cbor2.dumps("dtype")
            value += cbor2.dumps(DTYPE_NAMES[dtype]) + cbor2.dumps("shape")
            value += cbor2.dumps(list(shape)) + cbor2.dumps("data")
        else:
            raise StateError(f"dtype {dtype} has no wire form")
        value += _head(2, size)

        # Shortest, the entry is: map head, "name", the name, "value", value.
        name_bytes = cbor2.dumps(str(name))
        shortest = 1 + 5 + len(name_bytes) + 6 + len(value)
        pad = _PADDING[-(position + shortest) % ALIGN_BYTES]
        head = _head(5, 2, pad[0]) + _head(3, 4, pad[1]) + b"name" + name_bytes
        head += _head(3, 5, pad[2]) + b"value" + value
        parts += [head, size]
        position += len(head) + size

    buffer = bytearray(position)
    offsets, position = [], 0
    for part in parts:
        if isinstance(part, int):
            offsets.append(position)
            position += part
        else:
            buffer[position : position + len(part)] = part
            position += len(part)

    views = {}
    for (name, dtype, shape), offset in zip(spec, offsets):
        count = math.prod(shape)
        if count == 0:
            views[str(name)] = torch.empty(list(shape), dtype=dtype)
            continue
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        views[str(name)] = flat.reshape(list(shape))
    return buffer, views


# ---------------------------------------------------------------- decoding


def _check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise StateError(
            f"{where}: dimensions must be a list of at most {MAX_DIMS} integers; "
            f"got {shape!r:.80}"
        )
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_ELEMENTS:
            raise StateError(
                f"{where}: dimensions must be integers from 0 to {MAX_ELEMENTS}; "
                f"got {dim!r:.40}"
            )
    if math.prod(shape) > MAX_ELEMENTS:
        raise StateError(
            f"{where}: shape {shape} holds more than {MAX_ELEMENTS} elements"
        )
    return list(shape)


def _from_bytes(
    data: bytes | memoryview,
    dtype: torch.dtype,
    shape: list[int],
    *,
    copy: bool,
    big: bool,
) -> torch.Tensor:
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != count * itemsize:
        raise StateError(
            f"shape {shape} of {DTYPE_NAMES[dtype]} needs {count * itemsize} "
            f"bytes; got {len(data)}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)

    if big and itemsize > 1:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        swapped = raw.reshape(-1, itemsize).flip(1).contiguous()
        return swapped.view(dtype).reshape(shape)
    if copy:
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    # frombuffer warns that bytes are read-only; the caller asked for a view.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(data, dtype=dtype).reshape(shape)
    if tensor.data_ptr() % itemsize:
        return tensor.clone()
    return tensor


def decode_tensor(value: Any, *, where: str = "value", copy: bool = True) -> Any:
    """Turn one decoded wire value (tag 40 or the named form) into a tensor.

    Args:
        value: what :func:`decode_state`'s CBOR pass produced for the value.
        where: names the value in error messages.
        copy: give the tensor its own writable memory; ``False`` maps the
            received bytes (read-only) where alignment allows.

    Raises:
        StateError: the value is not a tensor, or its bytes do not match its
            shape.
    """
    if isinstance(value, _NdArray):
        shape = _check_shape(value.shape, where)
        if not isinstance(value.array, _RawArray):
            raise StateError(f"{where}: tag 40 must wrap an RFC 8746 typed array")
        raw = value.array
        return _from_bytes(raw.data, raw.dtype, shape, copy=copy, big=raw.is_big_endian)

    if isinstance(value, dict) and set(value) == {"dtype", "shape", "data"}:
        dtype = (
            _NAMED_DTYPES.get(value["dtype"])
            if isinstance(value["dtype"], str)
            else None
        )
        if dtype is None:
            raise StateError(
                f"{where}: dtype must be one of {sorted(_NAMED_DTYPES)} in the "
                f"named form; got {value['dtype']!r:.40}"
            )
        if not isinstance(value["data"], (bytes, memoryview)):
            raise StateError(f"{where}: data must be a byte string")
        shape = _check_shape(value["shape"], where)
        return _from_bytes(value["data"], dtype, shape, copy=copy, big=False)

    raise StateError(
        f"{where}: expected an RFC 8746 tag 40 array or "
        f'{{"dtype", "shape", "data"}}; got {type(value).__name__}'
    )


def decode_state(
    data: bytes | bytearray | memoryview,
    *,
    copy: bool = True,
    max_tensors: int | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a state document into an ordered ``{name: tensor}`` dict.

    Args:
        data: the document's bytes.
        copy: give each tensor its own writable memory. ``False`` maps the
            tensors onto the document's buffers, which is faster and uses
            less memory, but the tensors must then never be written to.
        max_tensors: when given, refuse (before decoding) a document with
            more CBOR items than that many tensors can need.

    Raises:
        StateError: the bytes are not a valid state document; the message
            says what was received and what is expected.
    """
    # A tensor takes at most 12 items plus one per dimension.
    max_items = MAX_ITEMS if max_tensors is None else 16 + max_tensors * (12 + MAX_DIMS)
    document = load_views(data, max_items=max_items, arrays=True)
    if not isinstance(document, dict):
        raise StateError(
            f"a state document must be a map; got {type(document).__name__}"
        )
    if document.get("format") != STATE_FORMAT:
        raise StateError(
            f'"format" must be {STATE_FORMAT!r}; got {document.get("format")!r:.60}'
        )
    if document.get("version") != STATE_VERSION:
        raise StateError(
            f'"version" {document.get("version")!r:.20} is not supported; '
            f"this runtime reads version {STATE_VERSION}"
        )
    entries = document.get("tensors")
    if not isinstance(entries, list):
        raise StateError('"tensors" must be a list of {"name", "value"} maps')

    state: dict[str, torch.Tensor] = {}
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise StateError(f"tensor {index} must be a map with a non-empty name")
        if name in state:
            raise StateError(f"tensor name {name!r:.60} appears twice")
        state[name] = decode_tensor(
            entry.get("value"), where=f"tensor {name!r:.60}", copy=copy
        )
    return state


def state_spec(
    state: Mapping[str, torch.Tensor],
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Return ``(name, dtype, shape)`` per tensor, in order: what diffs must match."""
    return [
        (name, DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        for name, t in state.items()
    ]
