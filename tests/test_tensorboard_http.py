"""What a user sees: a real TensorBoard server serving a monitored run over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from helpers import register_tiny_backbone, run_train, tiny_config

EPOCHS = 3
STARTUP_S = 60  # the server must answer within this, else the test is skipped
LOAD_S = 60  # once it answers, the run's data must be served within this, else it fails
# Logged every epoch; drift needs a previous epoch, so it starts at the second.
PER_EPOCH = ["cue_energy/biased", "cue_energy/clean", "object_energy", "pointing_game",
             "concentration", "nan_maps"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **query) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _json(base: str, path: str, **query):
    return json.loads(_get(base, path, **query))


def _wait_for_server(base: str, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"tensorboard exited with {proc.returncode}: {log_path.read_text()[-800:]}")
        try:
            _get(base, "/data/runs")
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.skip(f"tensorboard did not answer within {STARTUP_S} s: {log_path.read_text()[-800:]}")


def _scalar_steps(base: str, run: str, tag: str) -> list[int]:
    return [int(step) for _, step, _ in _json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)]


@pytest.mark.slow
def test_tensorboard_serves_grids_and_scalars_once_per_epoch(tmp_path) -> None:
    cfg = tiny_config(tmp_path, epochs=EPOCHS, backbone=register_tiny_backbone())
    cli = run_train(["fit", "--config", str(cfg)])
    # Lightning logs an epoch's validation at the step of its last training batch (batch k
    # of the run is step k); the monitor logs beside it.
    steps = [cli.trainer.num_training_batches * (e + 1) - 1 for e in range(EPOCHS)]
    run = "tiny/version_0"  # <save_dir>/<name>/<version> relative to --logdir
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "tensorboard.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"),
             "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
             "--reload_interval", "1"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_server(base, proc, log_path)
        # The first load runs in the background: wait until the last point is served.
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline:
            tags = _json(base, "/data/plugin/scalars/tags").get(run, {})
            if "val/acc" in tags and len(_scalar_steps(base, run, "val/acc")) >= EPOCHS:
                break
            time.sleep(0.5)
        assert run in _json(base, "/data/runs")
        scalar_tags = _json(base, "/data/plugin/scalars/tags")[run]
        explain_tags = sorted(t for t in scalar_tags if t.startswith("explain/gradcam/"))
        assert explain_tags == sorted(f"explain/gradcam/{n}" for n in [*PER_EPOCH, "drift"])
        # Exactly one point per epoch, at the same increasing steps as val/acc.
        assert _scalar_steps(base, run, "val/acc") == steps
        for name in PER_EPOCH:
            assert _scalar_steps(base, run, f"explain/gradcam/{name}") == steps, name
        assert _scalar_steps(base, run, "explain/gradcam/drift") == steps[1:]
        values = _json(base, "/data/plugin/scalars/scalars", run=run,
                       tag="explain/gradcam/concentration")
        assert all(0.0 <= v <= 1.0 for _, _, v in values)

        image_tags = _json(base, "/data/plugin/images/tags")[run]
        assert "explain/gradcam/grid" in image_tags
        images = _json(base, "/data/plugin/images/images", run=run, tag="explain/gradcam/grid",
                       sample=0)
        assert [im["step"] for im in images] == steps
        # The browser fetches each grid by its query: it must be a PNG of a real grid.
        png = _get(base, "/data/plugin/images/individualImage?" + images[-1]["query"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
