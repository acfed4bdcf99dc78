"""Fixtures for the Prefect flow tests: one Prefect test server per session, a moto S3 server,
a tiny random prior saved to disk, and helpers that write real photo crops (skimage.data).

Kept out of tests/conftest.py so that the non-flow tests do not pay the ~10 s server start.
"""

from __future__ import annotations

import io
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageCms

from gdp.prior.checkpoint import PriorSpec, build_prior, save_prior

TINY_PRESET = "adm-tiny-32"


@pytest.fixture(scope="session", autouse=True)
def prefect_backend():
    """A temporary Prefect API server (SQLite in a temp dir) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_backend) -> str:
    from prefect.settings import PREFECT_API_URL
    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_prior_path(tmp_path_factory) -> str:
    """adm-tiny-32 (32-px patches) with small random non-zero weights, written by save_prior."""
    spec = PriorSpec.from_preset(TINY_PRESET)
    prior = build_prior(spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prior.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    save_prior(str(path), prior, spec)
    return str(path)


# ------------------------------------------------------------------------------------------ S3


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_env(moto_endpoint):
    """Fake AWS credentials and AWS_ENDPOINT_URL for one test module: plain s3:// URLs reach moto."""
    import s3fs

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": moto_endpoint}.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield moto_endpoint
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_env):
    """A fresh s3fs filesystem without listing cache (the flow's threads have their own instances)."""
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


# -------------------------------------------------------------------------------------- images


def crop(height: int, width: int, name: str = "astronaut", top: int = 0, left: int = 0,
         step: int = 4) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] crop of a skimage photo, sampled every `step` pixels."""
    array = np.asarray(getattr(skimage.data, name)())
    out = array[top:top + height * step:step, left:left + width * step:step]
    assert out.shape[:2] == (height, width), f"{name} too small for {height}x{width}"
    return np.ascontiguousarray(out)


def downsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Average pooling (the sr operator's default filter), rounded to uint8."""
    h, w = array.shape[:2]
    x = array.astype(np.float64).reshape(h // factor, factor, w // factor, factor, *array.shape[2:])
    return np.round(x.mean(axis=(1, 3))).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, orientation: int | None = None, icc: bytes | None = None) -> bytes:
    params = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    if icc is not None:
        params["icc_profile"] = icc
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **params)
    return buf.getvalue()


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def gray16(height: int, width: int) -> np.ndarray:
    """16-bit gray crop of skimage's camera, with low bytes that are not all equal to the high ones."""
    g = crop(height, width, "camera").astype(np.uint16)
    return (g * 256 + (g // 3)).astype(np.uint16)


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture(scope="session")
def images() -> SimpleNamespace:
    """Image-building helpers (no state)."""
    return SimpleNamespace(crop=crop, downsample=downsample, png=png_bytes, jpeg=jpeg_bytes, icc=srgb_icc,
                           gray16=gray16, write=write)


# ------------------------------------------------------------------------------ flaky network


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 in front of another loopback server, that can go down: `down()` closes
    its listening socket and every open connection (clients then get ECONNREFUSED, as from a
    storage endpoint that is unreachable), `up()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]):
        import socket
        import threading
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._conns: list = []
        self._listener = None
        self.refused_since: float | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        import socket
        import threading
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self.refused_since = None
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        import socket
        import time
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        self.refused_since = time.monotonic()
        if listener:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener) -> None:
        import socket
        import threading
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        import socket
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.down()


@pytest.fixture
def s3_proxy(s3_env, moto_endpoint):
    """A LoopbackProxy in front of the moto server, and AWS_ENDPOINT_URL pointing at it for the test."""
    import s3fs
    host, port = moto_endpoint.removeprefix("http://").split(":")
    proxy = LoopbackProxy((host, int(port)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy
        proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()
