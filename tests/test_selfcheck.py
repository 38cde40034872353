"""A checkpoint copied away from its manifest (scp, a backup, an MLflow download) still verifies
itself: one flipped bit anywhere that matters is reported as corrupt."""
import shutil
import struct
import zipfile
from types import SimpleNamespace

import pytest
from builders import save_lmpipe, save_nanogpt

from lmpipe.ckpt.integrity import verify_checkpoint
from lmpipe.ckpt.locate import resolve_checkpoint
from lmpipe.ckpt.store import list_checkpoints
from lmpipe.cli.main import main
from lmpipe.common.errors import UserError


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def data_start(raw: bytes, info: zipfile.ZipInfo) -> int:
    n, m = struct.unpack_from("<2H", raw, info.header_offset + 26)
    return info.header_offset + 30 + n + m


PARTS = ["tensor data", "pickle (data.pkl)", "local header: name", "local header: time",
         "local header: padding", "data descriptor: crc", "central directory: crc",
         "central directory: header offset", "central directory: name",
         "central directory: attributes", "end record: entry count"]


def offsets(path) -> dict[str, int]:
    """One byte in each part of torch's zip layout."""
    raw = path.read_bytes()
    zf = zipfile.ZipFile(path)
    pkl = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    tensor = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    end = raw.rfind(b"PK\x05\x06")
    n, m = struct.unpack_from("<2H", raw, pkl.header_offset + 26)
    padding = pkl.header_offset + 30 + n + (4 + (m - 4) // 2 if m > 4 else 2)
    return {"tensor data": data_start(raw, tensor) + tensor.file_size // 2,
            "pickle (data.pkl)": data_start(raw, pkl) + pkl.file_size // 2,
            "local header: name": pkl.header_offset + 32,
            "local header: time": tensor.header_offset + 10,
            "local header: padding": padding,
            "data descriptor: crc": data_start(raw, pkl) + pkl.file_size + 5,
            "central directory: crc": zf.start_dir + 17,
            "central directory: header offset": zf.start_dir + 43,
            "central directory: name": zf.start_dir + 48,
            "central directory: attributes": zf.start_dir + 38,
            "end record: entry count": end + 10}


def flipped(src, dst, offset):
    raw = bytearray(src.read_bytes())
    raw[offset] ^= 0x04
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(bytes(raw))
    return dst


@pytest.fixture
def healthy(project):
    return save_lmpipe(project / "checkpoints", 20, source="dear_agnes")


def test_a_healthy_copy_verifies_without_its_manifest(healthy, capsys):
    copy = healthy.parent.parent / "copies" / healthy.name
    copy.parent.mkdir()
    shutil.copy(healthy, copy)
    v = verify_checkpoint(copy)
    assert v.ok and "zip records match their CRC-32s" in v.detail
    assert verify_checkpoint(copy, deep=True).ok
    code, out, _ = run(capsys, "ckpt", "verify", str(copy))
    assert code == 0 and f"ok    {copy}" in out and "zip records match their CRC-32s" in out


@pytest.mark.parametrize("part", PARTS)
def test_a_flipped_bit_in_a_copy_is_corrupt(healthy, capsys, part):
    copy = flipped(healthy, healthy.parent.parent / "copies" / healthy.name, offsets(healthy)[part])
    for deep in (False, True):
        v = verify_checkpoint(copy, deep=deep)
        assert v.status == "corrupt", (part, deep, v)
    code, out, _ = run(capsys, "ckpt", "verify", str(copy))
    assert code == 1 and f"FAIL  {copy}: integrity: {copy.name}: " in out, out
    code, out, _ = run(capsys, "ckpt", "doctor", str(copy))
    assert code == 4 and "corrupted" in out


def test_latest_skips_a_damaged_copy(healthy, project):
    """resume's 'latest' in a directory of copies (no manifest): the damaged newest is skipped."""
    older = save_lmpipe(project / "checkpoints", 10, source="dear_agnes")
    d = project / "restored"
    d.mkdir()
    shutil.copy(older, d / older.name)
    newest = flipped(healthy, d / healthy.name, offsets(healthy)["tensor data"])
    assert list_checkpoints(d)[-1] == newest
    assert resolve_checkpoint("latest", d) == d / older.name


def test_other_trainers_files_check_themselves(project, capsys):
    path = save_nanogpt(project / "nanogpt")
    assert run(capsys, "ckpt", "verify", str(path))[0] == 0
    flipped(path, path, offsets(path)["tensor data"])
    code, out, _ = run(capsys, "ckpt", "verify", str(path))
    assert code == 1 and "integrity: ckpt.pt: zip record data/" in out and "fails its CRC-32" in out


def test_the_served_model_checks_its_checkpoint_artifact(healthy, project):
    from lmpipe.serving import TextGenerator

    artifact = flipped(healthy, project / "artifacts" / "checkpoint.pt",
                       offsets(healthy)["tensor data"])
    context = SimpleNamespace(artifacts={"checkpoint": str(artifact)})
    with pytest.raises(UserError, match="checkpoint artifact is corrupt .*fails its CRC-32"):
        TextGenerator().load_context(context)
    shutil.copy(healthy, artifact)
    model = TextGenerator()
    model.load_context(context)
    assert model.tok.vocab_size > 0
