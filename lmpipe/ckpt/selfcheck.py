"""A checkpoint that vouches for itself: a copy with no manifest beside it (scp, a backup, an
MLflow artifact download) is still checked for damage.

torch.save writes a zip archive of uncompressed records (data.pkl, one record per tensor storage,
version, byteorder, ...), and the zip format stores a CRC-32 of every record. self_check streams
each record and compares. Why these CRCs rather than a hash embedded at save time: they are in
every torch checkpoint ever written (lmpipe's older ones, nanoGPT's, Lightning's), so any copy can
be checked with no change to the format, and zlib's CRC-32 is faster than sha256. A CRC-32 catches
every error of up to 32 consecutive bits in a record.

The CRCs do not cover the headers that locate the records, so those are checked for consistency:
each local header and data descriptor must agree with its central-directory entry, the records
must tile the file from byte 0 to the central directory, the entries must fill the directory
exactly, and the end records must agree with each other and count the entries. What is left
unchecked (the version fields of the zip64 end record; in archives not written by torch, the
entries' attribute fields) is never read by torch.load.
"""
from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

CHUNK = 16 << 20
# local header: sig, version, flags, method, time, date, crc, sizes, name and extra lengths
_LOCAL = struct.Struct("<4s5H3L2H")
# central-directory entry: sig, made by, version, flags, method, time, date, crc, sizes,
# name/extra/comment lengths, disk, attributes, local header offset
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")  # sig, disks, entry counts, directory size and offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # sig, disk, offset of the zip64 end record, disks
_END64 = struct.Struct("<4sQ2H2L4Q")  # sig, size, versions, disks, counts, directory size, offset
_FULL32, _FULL16 = 0xFFFFFFFF, 0xFFFF  # "the real value is in the zip64 fields"


@dataclass(frozen=True)
class Verification:
    status: str  # ok | unverified (nothing to check it against) | corrupt | missing
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Damaged(Exception):
    """What is wrong inside the archive."""


class _Entry(NamedTuple):
    """One central-directory entry."""
    name: bytes
    fields: tuple  # version, flags, method, time, date: what its local header repeats
    crc: int
    csize: int
    usize: int
    offset: int
    writer: tuple  # made by, disk, attributes: the same for every entry torch writes
    zip64: bytes  # its zip64 extra field's data; torch repeats it in the local header

    @property
    def label(self) -> str:  # torch names records <archive>/data.pkl, <archive>/data/0, ...
        return self.name.decode("utf-8", "replace").split("/", 1)[-1]


def self_check(path: str | Path) -> Verification:
    """ok: every zip record matches its CRC-32 and every header agrees with the central
    directory; corrupt: what does not; unverified: not a zip archive (torch's legacy format,
    safetensors), which carries no checksums."""
    path = Path(path)
    if not path.is_file():
        return Verification("missing", f"{path}: no such file")
    with open(path, "rb", buffering=0) as f:
        if f.read(4) != b"PK\x03\x04" and not zipfile.is_zipfile(f):
            return Verification("unverified",
                                f"{path.name} is not a zip archive: it carries no checksums")
        try:
            n = _check_archive(f)
        except Exception as e:  # damaged bytes surface as many types (struct.error, ValueError...)
            what = str(e) if isinstance(e, Damaged) else f"{type(e).__name__}: {e}"
            return Verification("corrupt", f"{path.name}: {what} (the file changed after it was "
                                           "written: a disk error, a bad copy or tampering)")
    return Verification("ok", f"its {n} zip records match their CRC-32s")


def _check_archive(f: BinaryIO) -> int:
    cd_start, cd_size, count = _end_records(f, f.seek(0, 2))
    entries = _central_directory(f, cd_start, cd_size, count)
    ends = [e.offset for e in entries[1:]] + [cd_start]
    strict = _torch_written(entries)
    buf = memoryview(bytearray(min(CHUNK, max((e.csize for e in entries), default=0))))
    at = 0  # the records tile the file: each starts where the one before ends
    for e, end in zip(entries, ends, strict=True):
        if e.offset != at:
            raise Damaged(f"zip record {e.label} starts at byte {e.offset}, not {at}")
        _check_record(f, e, end, strict, buf)
        at = end
    return len(entries)


def _torch_written(entries: list[_Entry]) -> bool:
    """torch.save's archives: entries written alike, local extra fields only zip64 and padding."""
    return any(e.name.endswith(b"/data.pkl") for e in entries)


# --- the end records and the central directory ------------------------------------------------

def _end_records(f: BinaryIO, size: int) -> tuple[int, int, int]:
    """(directory start, size, entries) from the end record and, if present, the zip64 one."""
    tail_len = min(size, _END.size + _FULL16)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _END.size:
        raise Damaged("no zip end record (the file is truncated)")
    _, disk, cd_disk, here, total, cd_size, cd_start, comment = _END.unpack_from(tail, at)
    end_at = size - tail_len + at
    if at + _END.size + comment != len(tail) or (disk, cd_disk) != (0, 0) or here != total:
        raise Damaged("the zip end record is inconsistent")
    if end_at >= _LOCATOR.size + _END64.size:
        f.seek(end_at - _LOCATOR.size)
        locator = _LOCATOR.unpack(f.read(_LOCATOR.size))
        if locator[0] == b"PK\x06\x07":
            return _zip64_end(f, locator, end_at, (total, cd_size, cd_start))
    if cd_start + cd_size != end_at:
        raise Damaged("the zip end record's directory size and offset do not meet it")
    return cd_start, cd_size, total


def _zip64_end(f: BinaryIO, locator: tuple, end_at: int, short: tuple) -> tuple[int, int, int]:
    _, disk, at, disks = locator
    if (disk, disks, at) != (0, 1, end_at - _LOCATOR.size - _END64.size):
        raise Damaged("the zip64 end locator is inconsistent")
    f.seek(at)
    sig, size, _, _, disk, cd_disk, here, total, cd_size, cd_start = _END64.unpack(
        f.read(_END64.size))
    if sig != b"PK\x06\x06" or size != _END64.size - 12 or (disk, cd_disk, here) != (0, 0, total):
        raise Damaged("the zip64 end record is inconsistent")
    full = (_FULL16, _FULL32, _FULL32)  # the short record holds each value or "see zip64"
    if any(s not in (v, m) for s, v,
           m in zip(short, (total, cd_size, cd_start), full, strict=True)) or \
            cd_start + cd_size != at:
        raise Damaged("the zip end record and the zip64 end record disagree")
    return cd_start, cd_size, total


def _central_directory(f: BinaryIO, start: int, size: int, count: int) -> list[_Entry]:
    f.seek(start)
    raw = f.read(size)
    entries, at = [], 0
    while at < size:
        e, at = _entry(raw, at)
        entries.append(e)
    if at != size or len(entries) != count:
        raise Damaged(f"the zip central directory holds {len(entries)} entries in {at} bytes; "
                      f"the end record says {count} in {size}")
    if _torch_written(entries) and len({e.writer for e in entries}) > 1:
        raise Damaged("the zip central directory's entries disagree on their attributes")
    return sorted(entries, key=lambda e: e.offset)


def _entry(raw: bytes, at: int) -> tuple[_Entry, int]:
    (sig, made_by, version, flags, method, time, date, crc, csize, usize, n, m, k, disk, iattr,
     eattr, offset) = _CENTRAL.unpack_from(raw, at)
    if sig != b"PK\x01\x02":
        raise Damaged(f"the zip central directory has no entry at its byte {at}")
    name_at = at + _CENTRAL.size
    name, extra = raw[name_at:name_at + n], raw[name_at + n:name_at + n + m]
    if len(name) != n or len(extra) != m or name_at + n + m + k > len(raw):
        raise Damaged("a zip central directory entry runs past the directory's end")
    z64 = dict(_subfields(extra)).get(0x0001, b"")
    usize, csize, offset, disk = _zip64_values(z64, (usize, csize, offset, disk))
    return (_Entry(name, (version, flags, method, time, date), crc, csize, usize, offset,
                   (made_by, disk, iattr, eattr), z64), name_at + n + m + k)


def _zip64_values(z64: bytes, values: tuple[int, ...]) -> tuple[int, ...]:
    """Sizes, offset and disk; those the entry marks "see zip64" read from its zip64 field."""
    wide = [i for i, v in enumerate(values) if v == (_FULL16 if i == 3 else _FULL32)]
    fmt = "<" + "".join("L" if i == 3 else "Q" for i in wide)
    if len(z64) < struct.calcsize(fmt):
        raise Damaged("a zip central directory entry lacks the zip64 values it marks")
    out = list(values)
    for i, v in zip(wide, struct.unpack_from(fmt, z64), strict=True):
        out[i] = v
    return tuple(out)


def _subfields(extra: bytes) -> list[tuple[int, bytes]]:
    """An extra field's (id, data) parts; they must fill it exactly."""
    out, at = [], 0
    while at < len(extra):
        if at + 4 > len(extra):
            raise Damaged("a zip extra field is cut short")
        ident, n = struct.unpack_from("<2H", extra, at)
        out.append((ident, extra[at + 4:at + 4 + n]))
        at += 4 + n
    if at != len(extra):
        raise Damaged("a zip extra field's parts do not fill it")
    return out


# --- the records ------------------------------------------------------------------------------

def _check_record(f: BinaryIO, e: _Entry, end: int, torch_written: bool, buf: memoryview) -> None:
    """One record (local header, data, data descriptor) against its entry; it ends at `end`."""
    f.seek(e.offset)
    sig, version, flags, method, time, date, crc, csize, usize, n, m = _LOCAL.unpack(
        f.read(_LOCAL.size))
    name, extra = f.read(n), f.read(m)
    if sig != b"PK\x03\x04" or (version, flags, method, time, date) != e.fields or name != e.name:
        raise Damaged(f"the zip local header of {e.label} disagrees with the central directory")
    _check_extra(extra, e, torch_written)
    data_at = e.offset + _LOCAL.size + n + m
    _check_crc(f, e, data_at, buf)
    data_end = data_at + e.csize
    if flags & 0x08:  # the CRC and sizes follow the data, in a data descriptor
        if (crc, csize, usize) not in ((0, 0, 0), (e.crc, e.csize, e.usize)):
            raise Damaged(f"the zip local header of {e.label} records another CRC or size")
        _check_descriptor(f, e, data_end, end)
        return
    sizes_ok = (csize, usize) in ((e.csize, e.usize), (_FULL32, _FULL32))
    if crc != e.crc or not sizes_ok or data_end != end:
        raise Damaged(f"the zip local header of {e.label} records another CRC or size")


def _check_extra(extra: bytes, e: _Entry, torch_written: bool) -> None:
    """Well-formed; torch's padding all 'Z'; in torch's archives, only padding and the zip64 field
    that the central directory holds too."""
    for ident, data in _subfields(extra):
        bad = ident == 0x4246 and data.strip(b"Z")
        if torch_written:
            bad = bad or ident not in (0x0001, 0x4246) or ident == 0x0001 and data != e.zip64
        if bad:
            raise Damaged(f"the zip local header of {e.label} has a damaged extra field")


def _check_crc(f: BinaryIO, e: _Entry, data_at: int, buf: memoryview) -> None:
    """Stream the record's data through zlib.crc32, `buf` at a time."""
    if e.fields[2] != zipfile.ZIP_STORED:  # torch never compresses; other writers may
        _check_compressed(f, e)
        return
    f.seek(data_at)
    crc, left = 0, e.csize
    while left:
        got = f.readinto(buf[:min(left, len(buf))])
        if not got:
            raise Damaged(f"zip record {e.label} is cut short (the file is truncated)")
        crc, left = zlib.crc32(buf[:got], crc), left - got
    if crc != e.crc:
        raise Damaged(f"zip record {e.label} fails its CRC-32 "
                      f"(stored {e.crc:08x}, computed {crc:08x})")


def _check_compressed(f: BinaryIO, e: _Entry) -> None:
    name = e.name.decode("utf-8" if e.fields[1] & 0x800 else "cp437")
    try:
        with zipfile.ZipFile(f).open(name) as member:
            while member.read(CHUNK):
                pass
    except zipfile.BadZipFile as err:  # a CRC mismatch
        raise Damaged(f"zip record {e.label}: {err}") from None


def _check_descriptor(f: BinaryIO, e: _Entry, at: int, end: int) -> None:
    """The data descriptor between `at` and `end`: an optional signature, the CRC, then 4-byte
    sizes (8-byte in zip64 archives); its length tells which."""
    forms = {16: "<4xLLL", 12: "<LLL", 24: "<4xLQQ", 20: "<LQQ"}
    fmt = forms.get(end - at)
    f.seek(at)
    raw = f.read(end - at) if fmt else b""
    if fmt is None or (len(raw) in (16, 24) and raw[:4] != b"PK\x07\x08") or \
            struct.unpack(fmt, raw) != (e.crc, e.csize, e.usize):
        raise Damaged(f"the zip data descriptor of {e.label} disagrees with the central directory")
