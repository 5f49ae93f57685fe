"""The tags chunk (docs/FORMAT.md, section 13): the input's metadata, carried as optional data.

Tags are untrusted both ways: they come from whatever file was compressed and go to
whatever reads the ``.ecdc`` file back.  So every key and value is checked here, in one
place, for the writer and every reader alike: keys are short lowercase ASCII names,
values are non-empty UTF-8 without control characters, each and all of it bounded
before anything is read.  The chunk type is one that readers without this module skip
(section 8), so a file with tags stays readable by every version 1 reader.
"""

from __future__ import annotations

import re
import struct
from typing import Mapping

from ..errors import FormatError
from .chunks import CHUNK_HEAD, encode_chunk

#: Chunk type of the tags chunk (ASCII 'T').
CHUNK_TAGS = 0x54

#: The keys ecdc reads from and writes to audio files, in the order it writes them
#: (libsndfile's string fields; the names are Vorbis comment field names, lowercase).
TAG_KEYS = ("title", "artist", "album", "date", "tracknumber", "genre", "comment",
            "copyright", "license", "software")

#: Most entries one tags chunk may hold.
MAX_TAGS = 32
#: Longest key, in bytes.
MAX_KEY_BYTES = 32
#: Longest value, in bytes of UTF-8 (a long comment fits; lyrics do not, as in libsndfile).
MAX_VALUE_BYTES = 4096
#: Largest tags chunk payload: a reader refuses a larger one before reading it.
MAX_TAGS_PAYLOAD = 65536

_KEY = re.compile(rb"[a-z0-9_]{1,32}")
#: What no value may hold: C0 controls, DEL, C1 controls, the Unicode line and paragraph
#: separators (the characters ``messages.printable`` escapes), and lone surrogates.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: Lone surrogates: what bytes that are not UTF-8 become in a command line's arguments.
_SURROGATE = re.compile("[\ud800-\udfff]")
_KEY_LEN = struct.Struct("<B")
_VALUE_LEN = struct.Struct("<H")

Tags = dict[str, str]


def tag_problem(key: str, value: str) -> str | None:
    """Why ``key = value`` cannot be stored as a tag, or None if it can."""
    if not _KEY.fullmatch(key.encode("ascii", "replace")):
        return f"tag name {key!r} is not 1-{MAX_KEY_BYTES} of a-z, 0-9, _"
    if not value:
        return f"tag {key!r} is empty"
    if _SURROGATE.search(value):
        return f"tag {key!r} is not valid UTF-8"
    if _FORBIDDEN.search(value):
        return f"tag {key!r} holds control characters"
    size = len(value.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        return f"tag {key!r} is {size} bytes long, more than {MAX_VALUE_BYTES}"
    return None


def clean_value(value: str) -> str:
    """An untrusted value (an input file's tag) made storable, as far as it can be.

    Runs of control characters become one space (a multi-line comment stays readable on
    one line), surrounding blanks go, and a value over :data:`MAX_VALUE_BYTES` is cut at a
    character boundary. The result may be empty: such a tag is dropped.
    """
    text = _FORBIDDEN.sub(" ", value)
    text = re.sub(" {2,}", " ", text).strip()
    data = text.encode("utf-8")
    if len(data) > MAX_VALUE_BYTES:
        text = data[:MAX_VALUE_BYTES].decode("utf-8", "ignore").rstrip()
    return text


def encode_tags(tags: Mapping[str, str]) -> bytes:
    """The tags chunk's payload; ValueError if a key or value breaks the limits."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"{len(tags)} tags, more than the {MAX_TAGS} a tags chunk holds")
    parts = []
    for key, value in tags.items():
        problem = tag_problem(key, value)
        if problem is not None:
            raise ValueError(problem)
        k, v = key.encode("ascii"), value.encode("utf-8")
        parts += [_KEY_LEN.pack(len(k)), k, _VALUE_LEN.pack(len(v)), v]
    payload = b"".join(parts)
    if len(payload) > MAX_TAGS_PAYLOAD:  # pragma: no cover - 32 entries of the limits fit in 136 KB
        raise ValueError(f"tags take {len(payload)} bytes, more than the {MAX_TAGS_PAYLOAD}-byte limit")
    return payload


def tags_chunk(tags: Mapping[str, str]) -> bytes:
    """The whole tags chunk (framed, with its CRC), or b"" when there are no tags."""
    return encode_chunk(CHUNK_TAGS, encode_tags(tags)) if tags else b""


def parse_tags(payload: bytes, what: str = "the tags chunk") -> Tags:
    """Read a CRC-checked tags payload; FormatError naming ``what`` if anything is wrong.

    Nothing is allocated from a claimed length: every length is checked against the bytes
    that are there (the payload is at most :data:`MAX_TAGS_PAYLOAD`).
    """
    def bad(why: str) -> FormatError:
        return FormatError(f"corrupt .ecdc stream: {what}: {why}")

    if len(payload) > MAX_TAGS_PAYLOAD:
        raise bad(f"{len(payload)} bytes, more than the {MAX_TAGS_PAYLOAD}-byte limit")
    tags: Tags = {}
    pos, end = 0, len(payload)
    while pos < end:
        if len(tags) == MAX_TAGS:
            raise bad(f"more than {MAX_TAGS} entries")
        (key_len,) = _KEY_LEN.unpack_from(payload, pos)
        pos += _KEY_LEN.size
        if not 1 <= key_len <= MAX_KEY_BYTES or pos + key_len + _VALUE_LEN.size > end:
            raise bad(f"entry {len(tags)} has an invalid name length ({key_len})")
        raw_key = payload[pos:pos + key_len]
        pos += key_len
        if not _KEY.fullmatch(raw_key):
            raise bad(f"entry {len(tags)} has an invalid name (only a-z, 0-9 and _ are allowed)")
        key = raw_key.decode("ascii")
        (value_len,) = _VALUE_LEN.unpack_from(payload, pos)
        pos += _VALUE_LEN.size
        if not 1 <= value_len <= MAX_VALUE_BYTES or pos + value_len > end:
            raise bad(f"tag {key!r} has an invalid length ({value_len})")
        try:
            value = payload[pos:pos + value_len].decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"tag {key!r} is not valid UTF-8") from None
        pos += value_len
        if _FORBIDDEN.search(value):
            raise bad(f"tag {key!r} holds control characters")
        if key in tags:
            raise bad(f"tag {key!r} appears twice")
        tags[key] = value
    return tags


def tags_head(head: bytes) -> int | None:
    """The payload length of a tags chunk whose first 5 bytes are ``head``, else None."""
    if len(head) < CHUNK_HEAD.size:
        return None
    ctype, length = CHUNK_HEAD.unpack_from(head)
    return int(length) if ctype == CHUNK_TAGS else None
