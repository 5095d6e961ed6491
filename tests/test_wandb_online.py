"""``logger=wandb`` online with a key the server rejects: one line within 15 s, before any model
work; a server that cannot be reached or does not answer: offline, with a warning, in bounded
time (issue 12 §2). Stand-in servers on 127.0.0.1 only: no real network."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

import dpo_lightning.train as train_mod
from tests.test_user_errors import _error


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(train_mod, "build_policy", lambda *a, **k: pytest.fail("the model was built"))


class _Rejecting(http.server.BaseHTTPRequestHandler):
    """A stand-in W&B server that refuses every API key."""

    def do_POST(self):
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b'{"errors": ["invalid api key"]}')

    def log_message(self, *args):
        pass


@pytest.fixture
def wandb_online(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a well-formed fake key


def test_wandb_bad_key_fails_in_one_line_fast(tmp_path, capsys, no_model, wandb_online, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Rejecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        start = time.perf_counter()
        line = _error(["logger=wandb"], tmp_path, capsys)
        assert time.perf_counter() - start < 15
    finally:
        server.shutdown()
    assert "rejected the W&B API key (HTTP 401" in line and "wandb login --relogin" in line
    assert "logger.wandb.offline=true" in line


def test_wandb_unreachable_server_falls_back_offline_with_a_warning(
    tmp_path, capsys, wandb_online, monkeypatch
):
    from dpo_lightning.reporting.loggers import wandb_logger

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    logger = wandb_logger(project="p", save_dir=str(tmp_path))
    assert time.perf_counter() - start < 15
    out = capsys.readouterr().out
    assert "warning: W&B server http://127.0.0.1:9 cannot be reached" in out and "logging offline" in out
    assert logger._offline


def test_wandb_silent_server_is_bounded(tmp_path, capsys, wandb_online, monkeypatch):
    """A server that accepts the connection but never answers: offline after the timeout."""
    from dpo_lightning.reporting import loggers

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    monkeypatch.setattr(loggers, "VERIFY_TIMEOUT_S", 1.0)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        start = time.perf_counter()
        logger = loggers.wandb_logger(project="p", save_dir=str(tmp_path))
        assert time.perf_counter() - start < 5
    finally:
        listener.close()
    assert "did not answer" in capsys.readouterr().out and logger._offline
