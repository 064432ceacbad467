"""The soak's own engine: `vitserve serve` in a child process on a private ipc:// endpoint, stopped
with SIGTERM at the end, which must exit 0 and leave no socket file behind (its slabs, memory
files, cannot outlive it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

from vitserve.ipc.slab_channel import channel_path

START_TIMEOUT_S = 900.0  # loading and capturing a large model on a fresh machine
STOP_TIMEOUT_S = 120.0


@dataclass
class ServedEngine:
    process: asyncio.subprocess.Process
    endpoint: str
    devices: list[str]
    directory: str

    @classmethod
    async def start(cls, flags: tuple[str, ...]) -> ServedEngine:
        directory = tempfile.mkdtemp(prefix="vitserve-soak-")
        endpoint = f"ipc://{directory}/engine.sock"
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "vitserve.cli", "serve", "--endpoint",
                                                       endpoint, *flags, stdout=asyncio.subprocess.PIPE)
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        if b"ready" not in line:
            if process.returncode is None:
                process.kill()
            await process.wait()
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError(f"vitserve serve {' '.join(flags)} did not start (exit {process.returncode}): "
                               f"{line.decode(errors='replace').strip()}; see its log above")
        devices = flags[flags.index("--devices") + 1].split(",") if "--devices" in flags else ["cpu"]
        return cls(process, endpoint, devices, directory)

    async def stop(self) -> list[str]:
        """SIGTERM and wait; the problems found (exit status, socket files left)."""
        problems = []
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.process.kill()
            code = await self.process.wait()
            problems.append(f"the engine did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM")
        if code != 0:
            problems.append(f"the engine exited with status {code} on SIGTERM")
        path = self.endpoint.removeprefix("ipc://")
        left = [name for name in (path, channel_path(path)) if os.path.exists(name)]
        if left:
            problems.append(f"the engine left its socket files {left}")
        shutil.rmtree(self.directory, ignore_errors=True)
        return problems
