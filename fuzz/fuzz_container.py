#!/usr/bin/env python3
"""Coverage-guided fuzzing of the .ecdc reader and the bit unpacker with atheris.

atheris is a development tool, not a dependency of ecdc: ``pip install atheris``.
See fuzz/README.md for how to run it.  Each input is read by ``EcdcReader`` in
normal and in salvage mode and fed to ``unpack_codes``; anything other than an
``EcdcError`` (or a broken invariant, raised as AssertionError) is a crash.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import atheris

# Load ecdc.container and ecdc.bitpack without ecdc/__init__.py, which imports torch:
# the container must not need it, and instrumenting torch would be slow and pointless.
_ROOT = Path(__file__).resolve().parent.parent
_pkg = types.ModuleType("ecdc")
_pkg.__path__ = [str(_ROOT / "ecdc")]  # type: ignore[attr-defined]
sys.modules.setdefault("ecdc", _pkg)

with atheris.instrument_imports(include=["ecdc"]):
    from ecdc import bitpack, container  # noqa: F401 - container: instrumented here, read by the checks
    from ecdc.errors import EcdcError

# The invariants, shared with tests/test_fuzz.py; imported after (and using) the
# instrumented ecdc.container above.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from container_checks import check_reads, fix_crcs  # noqa: E402


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    check_reads(data)
    fixed = fix_crcs(data)
    if fixed != data:
        check_reads(fixed)

    # unpack_codes: bits and count from the first bytes, the rest is the packed data.
    if len(data) >= 3:
        bits = data[0] % 18  # 0 and 17 are invalid on purpose
        count = int.from_bytes(data[1:3], "little")
        packed = data[3:]
        try:
            values = bitpack.unpack_codes(packed, bits, count)
        except (EcdcError, ValueError):
            return
        assert values.shape == (count,) and (values >= 0).all() and (values < (1 << bits)).all()
        need = bitpack.packed_size(count, bits)
        again = bitpack.pack_codes(values, bits)
        assert len(again) == need
        # pack(unpack(x)) == x, except the unused bits of the last byte, which pack zeroes.
        if need:
            spare = need * 8 - count * bits
            mask = (0xFF >> spare) if spare else 0xFF
            assert again[:-1] == packed[:need - 1] and again[-1] == packed[need - 1] & mask


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
