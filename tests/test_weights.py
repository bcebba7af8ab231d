"""The pretrained-weights download (utils.download_checked, config.fetch_pretrained/resolve_pretrained_path):
a local ``file://`` address, a damaged file, a connection dropped half-way, the offline message."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import WEIGHTS_MIRROR_ENV, fetch_pretrained, resolve_pretrained_path
from models.encoder import PRETRAINED
from utils import DownloadError, download_checked

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def _prefix(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def test_torchvision_file_names_carry_the_hash_prefix():
    assert PRETRAINED["deeplabv3"].sha256_prefix == "586e9e4e"
    assert PRETRAINED["resnet101"].sha256_prefix == "63fe2227"


def test_file_url_download_is_checked(tmp_path: Path):
    source = tmp_path / "source.pth"
    source.write_bytes(PAYLOAD)
    target = tmp_path / "out" / "weights.pth"
    target.parent.mkdir()
    assert download_checked(source.as_uri(), target, _prefix(PAYLOAD), progress=False) == target
    assert target.read_bytes() == PAYLOAD


def test_damaged_file_leaves_nothing(tmp_path: Path):
    source = tmp_path / "source.pth"
    damaged = bytearray(PAYLOAD)
    damaged[1000] ^= 0xFF
    source.write_bytes(bytes(damaged))
    target = tmp_path / "out" / "weights.pth"
    target.parent.mkdir()
    with pytest.raises(DownloadError, match="invalid hash value.*none kept"):
        download_checked(source.as_uri(), target, _prefix(PAYLOAD), progress=False)
    assert list(target.parent.iterdir()) == []  # neither the file nor a temporary


@pytest.fixture
def dropping_server() -> Iterator[str]:
    """An HTTP server that announces the whole payload and closes the connection half-way."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_dropped_half_way_leaves_nothing(tmp_path: Path, dropping_server: str):
    target = tmp_path / "weights.pth"
    with pytest.raises(DownloadError, match="invalid hash value"):
        download_checked(f"{dropping_server}/weights.pth", target, _prefix(PAYLOAD), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_fetch_through_a_mirror_and_the_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``$DIFD_WEIGHTS_MIRROR`` serves torchvision's file names; the real files' hashes are checked, so a
    stand-in file of the same name is refused, and a missing file says the command and the place."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / PRETRAINED["resnet101"].file_name).write_bytes(PAYLOAD)  # not torchvision's file
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, mirror.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(DownloadError, match="invalid hash value"):
        fetch_pretrained("resnet101", tmp_path / "fetched.pth")
    assert not (tmp_path / "fetched.pth").exists()

    with pytest.raises(FileNotFoundError) as missing:
        resolve_pretrained_path("deeplabv3", None, download=True)
    message = str(missing.value)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / PRETRAINED["deeplabv3"].file_name
    assert (
        "downloading it failed" in message and "python script/launch.py weights --kind deeplabv3" in message
    )
    assert str(expected) in message and not expected.exists()
    assert list(expected.parent.iterdir()) == []
