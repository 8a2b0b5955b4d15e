"""Hypothesis strategies for fuzzing gRPC methods with raw bytes: random messages of a protobuf
type built from its descriptor, those messages truncated or with bytes flipped, and plain random
bytes; and a raw caller that sends bytes and returns the status it got."""

from __future__ import annotations

from collections import Counter

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int(low: int, high: int):
    # Edges and small values find more than uniform draws over 64 bits.
    return st.one_of(
        st.sampled_from([low, high, 0, 1]),
        st.integers(-3, 300).filter(lambda v: low <= v <= high),
        st.integers(low, high),
    )


def _scalar(field: FieldDescriptor):
    kind = field.type
    if kind in _INTS:
        return _int(*_INTS[kind])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 6)  # proto3 enums are open: unknown numbers parse too
    raise TypeError(f"no strategy for field {field.full_name}")


def messages(descriptor: Descriptor, overrides: dict | None = None, depth: int = 3):
    """Random messages of `descriptor`'s type; `overrides` maps a field's full name to a
    strategy for its (single) value, to steer some fields towards valid values."""
    overrides = overrides or {}
    cls = message_factory.GetMessageClass(descriptor)

    def value(field: FieldDescriptor):
        if field.full_name in overrides:
            return overrides[field.full_name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth <= 0:
                return st.just(message_factory.GetMessageClass(field.message_type)())
            return messages(field.message_type, overrides, depth - 1)
        return _scalar(field)

    @st.composite
    def build(draw):
        msg = cls()
        chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            real_oneof = oneof is not None and not oneof.name.startswith("_")  # not `optional`
            if real_oneof and chosen[oneof.name] is not field:
                continue
            if field.is_repeated:
                items = draw(st.lists(value(field), max_size=3))
                container = getattr(msg, field.name)
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in items:
                        container.add().CopyFrom(item)
                else:
                    container.extend(items)
            elif (real_oneof and chosen[oneof.name] is field) or draw(st.booleans()):
                item = draw(value(field))
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, field.name).CopyFrom(item)
                else:
                    setattr(msg, field.name, item)
        return msg

    return build()


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for position, mask in flips:
        out[position % len(out)] ^= mask
    return bytes(out)


def payloads(descriptor: Descriptor, overrides: dict | None = None):
    """Raw request bytes: valid messages, truncated ones, ones with bytes flipped, noise."""
    valid = messages(descriptor, overrides).map(lambda m: m.SerializeToString())
    truncated = st.tuples(valid, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    flips = st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=4)
    flipped = st.tuples(valid, flips).map(lambda t: _flip(*t))
    return st.one_of(valid, truncated, flipped, st.binary(max_size=256))


class RawCaller:
    """Sends raw bytes to one method of a channel and tallies the status codes it gets."""

    def __init__(self, channel: grpc.Channel, path: str, streaming: bool, metadata=()):
        self.path = path
        factory = channel.unary_stream if streaming else channel.unary_unary
        self._call = factory(path)  # no serializers: bytes in, bytes out
        self._streaming = streaming
        self._metadata = metadata
        self.codes: Counter = Counter()

    def __call__(self, payload: bytes, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
        try:
            reply = self._call(payload, timeout=timeout, metadata=self._metadata)
            if self._streaming:
                for _ in reply:
                    pass
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.codes[code.name] += 1
        return code, details
