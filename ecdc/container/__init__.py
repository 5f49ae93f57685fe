"""The ``.ecdc`` container: format version 1 (read/write) and Meta's version 0 (read).

docs/FORMAT.md is the normative, byte-exact description; this package is one
implementation of it.  In short, a version 1 stream is::

    header   "ECDC" u8 major=1, u8 minor, u16 body_len, body, u32 crc32
    chunk*   u8 type, u32 payload_len, payload, u32 crc32
    end      a chunk of type 'E' carrying the sample count and chunk count

Design goals, and why:

* Streamable: a writer never seeks, so ``ecdc encode - > pipe`` works.  The
  header may say "sample count unknown"; the end chunk is authoritative.
* Robust: every chunk has its own CRC32 and a sequence number, the end chunk
  carries the number of code chunks, so corruption, truncation and dropped
  chunks are each reported as such instead of decoding garbage.
* Hostile-input safe: every length read from a file is bounded before it is
  used to read or allocate, so a 20-byte file cannot request gigabytes.
* Extensible: the header carries its own length (minor versions append
  fields), unknown chunk types are skipped, and a newer major version is
  refused with a message that says to upgrade.

Salvage API (``ecdc decompress --salvage``)::

    reader = EcdcReader(f, salvage=True)   # a damaged *header* still raises FormatError
    for item in reader:
        if isinstance(item, Gap):          # chunks that could not be recovered
            ...                            # silence: item.start_sample, item.num_samples
        else:                              # an intact CodeChunk; item.index is its chunk_index
            ...
    reader.damage          # list[str], one line per problem, e.g. "code chunk 5
                           # (4.95-5.94 s): CRC mismatch (code chunk at byte 1234),
                           # replaced by silence"; empty for an undamaged file
    reader.gaps            # list[Gap], the gaps yielded
    reader.total_samples   # the end marker's sample count if it survived, else None
    reader.salvaged_samples  # the length the evidence supports (the end marker's, when
                           # its silence is allowed), else None: keep what was recovered

Salvage never raises for damage after the header.  At a chunk that does not
parse (bad CRC, garbled length, truncation, garbage) it scans forward for the
next byte offset where a code chunk or end marker parses with a valid CRC, and
uses ``chunk_index`` to tell how many chunks were lost.  Gaps are sized as in
:class:`Gap`: unsegmented chunks all hold the same number of frames but the
last, segmented ones are one segment each, and the end marker sizes a gap at
the end.  Silence is only put where an intact chunk after the loss proves
it: a later chunk index, or the end marker.  A truncated end is reported, not
filled to the header's ``num_samples`` (an 81-byte header can claim a week).
And the silence in all stays within a limit proportional to the file's size
(:func:`salvage_silence_limit`, or ``max_silence``): where a gap would
exceed it, recovery stops there with a damage line.  Duplicated or
out-of-order chunks (an index already passed) are dropped; an index
implausibly far ahead (more than a week of audio) is ignored.  Decoders
should trim or pad the result to ``salvaged_samples`` when it is set (else
trim to ``total_samples`` or ``header.num_samples``, never pad), and produce a
gap's silence in blocks.  The scan is linear in the file size and holds at
most one chunk (16 MiB) plus 64 KiB in memory; after a resync it may have read
past the end marker of a non-seekable stream.  Version 0 files have no
checksums: salvage recovers the intact start of a truncated one (the rest is
reported) and turns a segment with an invalid scale into a Gap.

Where each part of the format lives:

* :mod:`.header`: constants and limits, :class:`StereoMode`, :class:`EcdcHeader`,
  encoding and decoding the header.
* :mod:`.chunks`: chunk framing, :class:`CodeChunk`, :class:`Gap`, code chunk payloads,
  the end marker (parsed in one place for every reader).
* :mod:`.writer`: :class:`EcdcWriter`, :func:`write_ecdc`.
* :mod:`.encoded`: :class:`EncodedAudio`, a whole file in memory.
* :mod:`.reader`: :class:`EcdcReader` (strict version 1, and the dispatch to salvage and
  version 0), :func:`read_ecdc`.
* :mod:`.scanner`: salvage's first stage, the resynchronising scanner, and the named
  events it passes on.
* :mod:`.salvage`: salvage's second stage, the gap accountant, and the silence limit.
* :mod:`.tags`: the tags chunk (the input's title, artist, ...), optional data old readers skip.
* :mod:`.v0`: Meta's version 0.
* :mod:`.source`: bounded reads from the file object.

This package deliberately imports only numpy and the standard library (never torch),
so that tools that only inspect files stay light.
"""

from __future__ import annotations

from ..bitpack import MAX_BITS, pack_codes, packed_size, unpack_codes
from ..errors import (
    ChecksumError,
    FormatError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from ..streams import write_all
from .chunks import (
    CHUNK_CODES,
    CHUNK_END,
    MAX_CHUNK_CODES,
    MAX_CHUNK_PAYLOAD,
    MAX_SCALE,
    CodeChunk,
    Gap,
    encode_chunk,
)
from .encoded import EncodedAudio
from .header import (
    FORMAT_MINOR,
    FORMAT_VERSION,
    MAGIC,
    MAX_CODEBOOKS,
    MAX_DURATION_SECONDS,
    MAX_HOP_LENGTH,
    MAX_MODEL_CHANNELS,
    MAX_NAME_BYTES,
    MAX_ORIGINAL_CHANNELS,
    MAX_SAMPLE_RATE,
    MAX_SEGMENT_LENGTH,
    MIN_ORIGINAL_SAMPLE_RATE,
    READABLE_VERSIONS,
    UNKNOWN_SAMPLES,
    EcdcHeader,
    StereoMode,
    encode_header,
    max_samples,
)
from .reader import EcdcReader, read_ecdc
from .salvage import SALVAGE_SILENCE_RATIO, salvage_silence_limit
from .tags import CHUNK_TAGS, TAG_KEYS, Tags
from .writer import EcdcWriter, write_ecdc

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FORMAT_MINOR",
    "READABLE_VERSIONS",
    "CHUNK_CODES",
    "CHUNK_END",
    "CHUNK_TAGS",
    "TAG_KEYS",
    "Tags",
    "MAX_CHUNK_PAYLOAD",
    "MAX_CHUNK_CODES",
    "MAX_DURATION_SECONDS",
    "MAX_SCALE",
    "SALVAGE_SILENCE_RATIO",
    "UNKNOWN_SAMPLES",
    "max_samples",
    "salvage_silence_limit",
    "StereoMode",
    "EcdcHeader",
    "CodeChunk",
    "Gap",
    "EcdcWriter",
    "EcdcReader",
    "EncodedAudio",
    "encode_header",
    "encode_chunk",
    "write_ecdc",
    "read_ecdc",
]

# Also importable from here, as they always were (not in __all__): the header's field
# limits (ecdc.models.encodec bounds its configs with them), the bit packer, the errors,
# and write_all.
_ALSO_EXPORTED = (
    MAX_BITS, MAX_CODEBOOKS, MAX_HOP_LENGTH, MAX_MODEL_CHANNELS, MAX_NAME_BYTES,
    MAX_ORIGINAL_CHANNELS, MAX_SAMPLE_RATE, MAX_SEGMENT_LENGTH, MIN_ORIGINAL_SAMPLE_RATE,
    pack_codes, packed_size, unpack_codes,
    ChecksumError, FormatError, TruncatedError, UnsupportedFeatureError, UnsupportedVersionError,
    write_all,
)
