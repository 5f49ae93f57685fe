"""Tags in audio files: what libsndfile reads and writes, and WAV's LIST/INFO chunk for pipes.

The ``.ecdc`` side (the tags chunk, its limits) is :mod:`ecdc.container.tags`; this module
is the audio side. A file's tags are untrusted: each value goes through
:func:`~ecdc.container.tags.clean_value` on the way in, so that what reaches the
container is storable. Files are read through libsndfile (its string fields: title,
artist, ... as WAV INFO, Vorbis comments in FLAC and Ogg, AIFF's text chunks); a WAV on a
pipe has its ``LIST``/``INFO`` chunk parsed here, and the streaming WAV writer puts one
before ``data`` so that the tags reach a pipe's reader with the header.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping

from .container.tags import MAX_TAGS_PAYLOAD, TAG_KEYS, Tags, clean_value, tag_problem

#: WAV INFO chunk ids of the tags, as libsndfile maps them (WAV has no licence field).
WAV_INFO_IDS = {"title": b"INAM", "artist": b"IART", "album": b"IPRD", "date": b"ICRD",
                "tracknumber": b"ITRK", "genre": b"IGNR", "comment": b"ICMT",
                "copyright": b"ICOP", "software": b"ISFT"}
_INFO_KEYS = {cid: key for key, cid in WAV_INFO_IDS.items()}
#: A LIST chunk larger than this is skipped unread on a pipe, not parsed (no tags from it).
MAX_WAV_LIST = MAX_TAGS_PAYLOAD


def cleaned(raw: Mapping[str, str]) -> Tags:
    """The known tags of ``raw`` (an input file's), cleaned, in ecdc's order; empty ones go."""
    tags: Tags = {}
    for key in TAG_KEYS:
        value = clean_value(raw.get(key) or "")
        if value:
            tags[key] = value
    return tags


def read_soundfile_tags(sf: Any) -> Tags:
    """The tags of an open ``soundfile.SoundFile`` (any format libsndfile reads), cleaned."""
    try:
        raw = sf.copy_metadata()
    except (RuntimeError, ValueError, UnicodeError):  # nothing worth failing a conversion over
        return {}
    return cleaned({str(k): str(v) for k, v in raw.items()})


def write_soundfile_tags(sf: Any, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a ``soundfile.SoundFile`` opened for writing, where its format holds them.

    libsndfile drops the fields a format has no place for (WAV: licence; AIFF keeps only a
    few); one it refuses outright is left out rather than failing the output.
    """
    for key in TAG_KEYS:
        value = tags.get(key)
        if value and tag_problem(key, value) is None:
            try:
                setattr(sf, key, value)
            except (RuntimeError, ValueError):
                pass


def parse_wav_info(body: bytes) -> Tags:
    """The tags of a WAV ``LIST`` chunk's body (``INFO`` and its sub-chunks), cleaned.

    Anything else (another list type, a truncated sub-chunk) gives what was read so far.
    """
    if len(body) < 4 or body[:4] != b"INFO":
        return {}
    raw: dict[str, str] = {}
    pos = 4
    while pos + 8 <= len(body):
        cid = body[pos:pos + 4]
        (size,) = struct.unpack_from("<I", body, pos + 4)
        pos += 8
        if size > len(body) - pos:
            break
        key = _INFO_KEYS.get(cid)
        if key is not None and key not in raw:
            raw[key] = body[pos:pos + size].split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += size + (size & 1)
    return cleaned(raw)


def wav_info_chunk(tags: Mapping[str, str]) -> bytes:
    """A ``LIST``/``INFO`` chunk holding ``tags`` (the ones WAV has ids for), or b"" if none.

    Values are NUL-terminated and padded to even length, as libsndfile writes them.
    """
    parts = [b"INFO"]
    for key in TAG_KEYS:
        value = tags.get(key)
        cid = WAV_INFO_IDS.get(key)
        if not value or cid is None or tag_problem(key, value) is not None:
            continue
        data = value.encode("utf-8") + b"\0"
        parts += [cid, struct.pack("<I", len(data)), data, b"\0" * (len(data) & 1)]
    if len(parts) == 1:
        return b""
    body = b"".join(parts)
    return b"LIST" + struct.pack("<I", len(body)) + body
