"""A local Hugging-Face-like HTTP server on 127.0.0.1 for download tests (never the internet).

Serves ``/<repo>/resolve/<revision>/<file>`` (HEAD and GET) with the headers huggingface_hub reads. Shared by the
engine's hub tests and the Slicer Logic's download tests (Testing/ is on sys.path: conftest)."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """``/<repo>/resolve/<revision>/<file>`` over HTTP on 127.0.0.1 with the headers huggingface_hub reads.
    ``etags`` overrides a file's advertised sha256; ``gate_after`` bytes into a GET the server waits for
    ``gate`` (set by the test once it has pressed Cancel), at most 20 s."""

    def __init__(self, files: dict, etags: dict = None, gate_after: int = None):
        self.files = {name: Path(path).read_bytes() if isinstance(path, Path) else path
                      for name, path in files.items()}
        self.etags = etags or {}
        self.gate_after, self.gate = gate_after, threading.Event()
        self.requests: list = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, with_body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                name = "/".join(parts[4:]) if len(parts) > 4 and parts[2] == "resolve" else None
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hub.etags.get(name, hashlib.sha256(data).hexdigest()) + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not with_body:
                    return
                split = len(data) if hub.gate_after is None else min(hub.gate_after, len(data))
                try:
                    self.wfile.write(data[:split])
                    self.wfile.flush()
                    if split < len(data):
                        hub.gate.wait(20)
                        self.wfile.write(data[split:])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client cancelled

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
