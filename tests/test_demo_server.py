"""`python -m flows demo`'s server start: a PID file left by a server that is gone is removed (Prefect
would refuse to start a new one), a live one is kept."""

from __future__ import annotations

import os
import subprocess
import sys

from prefect.settings import PREFECT_HOME, temporary_settings

from flows.__main__ import _background_server_alive


def test_stale_server_pid_file_is_removed_and_a_live_one_kept(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_file = tmp_path / "server.pid"
    with temporary_settings({PREFECT_HOME: tmp_path}):
        assert _background_server_alive() is False  # no PID file
        pid_file.write_text(str(gone.pid))
        assert _background_server_alive() is False
        assert not pid_file.exists()
        assert f"process {gone.pid}) is gone" in capsys.readouterr().out
        pid_file.write_text(str(os.getpid()))
        assert _background_server_alive() is True
        assert pid_file.exists()
