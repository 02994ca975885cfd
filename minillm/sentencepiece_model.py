"""The sentencepiece .model file, read and edited without the protobuf package: its wire format, the
vocabulary (pieces, scores, types), trainer and normaliser specs, and the merge list that makes a
`tokenizers` BPE model segment exactly like a sentencepiece BPE model.

~100 lines of wire-format code instead of a dependency: sentencepiece's own `sentencepiece_model_pb2` needs
protobuf, which is not a runtime dependency of minillm.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# sentencepiece_model.proto, the parts we use:
#   ModelProto     { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
#                    NormalizerSpec normalizer_spec = 3; SelfTestData self_test_data = 4; ... }
#   SentencePiece  { string piece = 1; float score = 2; Type type = 3 [default NORMAL]; }
#   TrainerSpec    { ModelType model_type = 3 [default UNIGRAM]; int32 vocab_size = 4; bool byte_fallback = 35; }
#   NormalizerSpec { string name = 1; bytes precompiled_charsmap = 2; bool add_dummy_prefix = 3 [default true];
#                    bool remove_extra_whitespaces = 4 [default true]; bool escape_whitespaces = 5 [default true]; }
# A message is a sequence of (tag = field_number << 3 | wire_type, value) records; a repeated field is just
# its records in order, and for a non-repeated field the last record wins. So pieces can be appended or
# replaced by rewriting field-1 records, and every other record is copied byte for byte.
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are sent as 10-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


@dataclass
class _Record:
    field: int
    wire_type: int
    value: int | bytes  # int for varint/fixed, bytes for length-delimited
    raw: bytes          # the whole record as it appeared, for verbatim copying


def _records(buf: bytes) -> list[_Record]:
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type == _FIXED64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire_type == _FIXED32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire_type == _LENGTH:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        out.append(_Record(field, wire_type, value, buf[start:pos]))
    return out


def _length_record(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LENGTH) + _encode_varint(len(payload)) + payload


def _varint_record(field: int, value: int) -> bytes:
    return _encode_varint(field << 3 | _VARINT) + _encode_varint(value)


def _submessage(proto: bytes, field: int) -> list[_Record]:
    """Records of a (non-repeated) sub-message; several occurrences merge, so concatenate them."""
    return _records(b"".join(r.value for r in _records(proto) if r.field == field and r.wire_type == _LENGTH))


def _last(records: list[_Record], field: int, default):
    values = [r.value for r in records if r.field == field]
    return values[-1] if values else default


def read_pieces(proto: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every vocabulary entry, in id order."""
    pieces = []
    for r in _records(proto):
        if r.field == 1 and r.wire_type == _LENGTH:
            sub = _records(r.value)
            piece = _last(sub, 1, b"").decode("utf-8")
            score = struct.unpack("<f", _last(sub, 2, 0).to_bytes(4, "little"))[0]
            pieces.append((piece, score, _last(sub, 3, PIECE_NORMAL)))
    return pieces


def read_trainer_spec(proto: bytes) -> dict:
    spec = _submessage(proto, 2)
    return {"model_type": _last(spec, 3, 1), "vocab_size": _last(spec, 4, 8000),
            "byte_fallback": bool(_last(spec, 35, 0))}


def read_normalizer_spec(proto: bytes) -> dict:
    spec = _submessage(proto, 3)
    return {"name": _last(spec, 1, b"").decode("utf-8"), "precompiled_charsmap": _last(spec, 2, b""),
            "add_dummy_prefix": bool(_last(spec, 3, 1)), "remove_extra_whitespaces": bool(_last(spec, 4, 1)),
            "escape_whitespaces": bool(_last(spec, 5, 1))}


def encode_piece(piece: str, score: float, kind: int = PIECE_NORMAL) -> bytes:
    payload = (_length_record(1, piece.encode("utf-8")) + _encode_varint(2 << 3 | _FIXED32)
               + struct.pack("<f", score) + _varint_record(3, kind))
    return _length_record(1, payload)


def rewrite_model_proto(proto: bytes, pieces: list[tuple[str, float, int]] | None = None,
                        add_dummy_prefix: bool | None = None, drop_self_test: bool = False) -> bytes:
    """A copy of `proto` with its vocabulary replaced by `pieces` (and trainer_spec.vocab_size updated),
    and/or normalizer_spec.add_dummy_prefix set. Everything else is copied byte for byte.
    drop_self_test removes the self-test samples, whose expected segmentations a changed vocabulary breaks
    (sentencepiece refuses to load a model that fails its own self-test)."""
    records = _records(proto)
    if add_dummy_prefix is not None and not any(r.field == 3 for r in records):
        records.append(_Record(3, _LENGTH, b"", b""))  # no normalizer_spec yet: start an empty one
    out = []
    for r in records:
        if r.field == 1 and pieces is not None:
            continue  # replaced below
        if r.field == 4 and drop_self_test:
            continue
        if r.field == 2 and pieces is not None and r.wire_type == _LENGTH:
            out.append(_length_record(2, r.value + _varint_record(4, len(pieces))))  # last value wins
            continue
        if r.field == 3 and add_dummy_prefix is not None and r.wire_type == _LENGTH:
            out.append(_length_record(3, r.value + _varint_record(3, int(add_dummy_prefix))))
            continue
        out.append(r.raw)
    if pieces is not None:
        out.insert(0, b"".join(encode_piece(*p) for p in pieces))
    return b"".join(out)



def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
    """Merge list for a `tokenizers` BPE model that segments like sentencepiece's BPE.

    sentencepiece's BPE keeps no merge list: starting from characters it repeatedly joins the adjacent pair
    whose concatenation is a vocabulary piece with the highest score. The equivalent merge list has one
    rule (left, right) for every way of splitting a normal piece into two normal pieces, ranked by the
    score of the joined piece (then by id, as transformers' own converter does)."""
    normal = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == PIECE_NORMAL}
    rules = []
    for joined, i in normal.items():
        score = pieces[i][1]
        for cut in range(1, len(joined)):
            left, right = joined[:cut], joined[cut:]
            if left in normal and right in normal:
                rules.append((-score, i, normal[left], normal[right], left, right))
    rules.sort()
    return [[left, right] for *_, left, right in rules]

