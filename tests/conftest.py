"""Shared fixtures."""
from __future__ import annotations

import os

# No model hub is reachable here: fail fast instead of retrying for a minute per lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per xdist worker (the workers share the cores), for this process and the
    # ones its tests start (dvc, dagster)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

import functools
import re
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # real data beside the repo, never in it


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny networks: the machine's cores are shared, and with
    one thread small convolutions run steadier (use with `pytestmark = usefixtures("one_thread")`)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_category(tmp_path):
    """A tiny synthetic fabric category (10 train, 64 px) and its defect bank (3 held out, 64 px)."""
    from ad_models.data.sources import prepare_category
    from ad_models.defects.bank import build_bank
    dataset = tmp_path / "fabric"
    prepare_category("synthetic", "fabric", dataset, n_train=10, n_test_good=4, n_test_defect=6, size=64, seed=0)
    bank = tmp_path / "bank"
    build_bank(dataset, bank, {"image_size": 64, "min_holdout": 3, "defects_per_image": 2}, progress=False)
    return dataset, bank


@pytest.fixture
def shared_data() -> Path:
    """The folder of real test data (../shared/data from the project root); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 serving a fresh folder.

    Yields a namespace: `root` (the served folder), `url` (its base URL), `requests` (the paths
    asked for, in order), `headers` (each request's headers, a dict, in the same order), `ranges`
    (set False to make the server ignore `Range` and always answer 200 with the whole file) and
    `cut` ({path: k}: the next GET of that path announces the full Content-Length, sends only k
    bytes of the body and closes the connection, like a dropped download). Files are answered with
    `Range: bytes=N-` support: 206 + Content-Range, or 416 when N is at or past the end."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "served"
    root.mkdir()
    state = SimpleNamespace(root=root, requests=[], headers=[], ranges=True, cut={})

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.path)
            state.headers.append(dict(self.headers))
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                return super().do_GET()  # 404s and folder listings as usual
            data = path.read_bytes()
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if match and state.ranges:
                start = int(match[1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = state.cut.pop(self.path, None)
            self.wfile.write(body if cut is None else body[:cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def pytest_collection_modifyitems(items):
    """The slow (real-data, end-to-end) tests first, so parallel workers do not end on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
