"""A whole .ecdc file in memory: its header, its code chunks and the lengths its end marker
holds. Torch-free, so that ``ecdc info`` and other inspecting tools read files without
loading a model; :mod:`ecdc.codec` turns one into audio and back."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO

from .chunks import CodeChunk
from .header import EcdcHeader
from .reader import EcdcReader
from .writer import EcdcWriter


@dataclass
class EncodedAudio:
    """Everything a .ecdc file holds, in memory."""

    header: EcdcHeader
    chunks: list[CodeChunk] = field(default_factory=list)
    num_samples: int = 0
    #: the input's length at header.original_sample_rate (None: unknown)
    original_samples: int | None = None
    #: the file's tags (docs/FORMAT.md, section 13): title, artist, ...
    tags: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write(buf)
        return buf.getvalue()

    def write(self, fileobj: BinaryIO) -> None:
        writer = EcdcWriter(fileobj, self.header, self.tags)
        for chunk in self.chunks:
            writer.write_chunk(chunk)
        writer.finish(self.num_samples, self.original_samples)

    @classmethod
    def read(cls, fileobj: BinaryIO) -> "EncodedAudio":
        return cls.from_reader(EcdcReader(fileobj))

    @classmethod
    def from_reader(cls, reader: EcdcReader) -> "EncodedAudio":
        """All of what ``reader`` holds, read to its end marker (strict: any damage raises)."""
        chunks = list(reader)
        total = reader.total_samples
        if total is None:
            total = reader.header.num_samples if reader.header.num_samples is not None else 0
        return cls(reader.header, chunks, int(total), reader.original_samples, dict(reader.tags))

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncodedAudio":
        return cls.read(io.BytesIO(data))

    @property
    def duration(self) -> float:
        return self.num_samples / self.header.sample_rate
