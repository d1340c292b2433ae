"""Start and stop Azurite's Table service on loopback, for tests and the local demo.

Azurite is the npm package `azurite` (installed by `make setup`). The table service listens on
127.0.0.1 at a free port, in memory by default or on disk under `location` (needed to restart
it with its data, e.g. for a chaos test). Every wait has a timeout: a launcher that cannot start
Azurite raises with Azurite's own output rather than hanging.

Azurite saves an on-disk database every 5 seconds and on SIGINT; `stop()` sends SIGINT (data
kept), `stop(graceful=False)` sends SIGKILL (a crash: up to 5 seconds of writes may be lost).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DEV_ACCOUNT_NAME = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
"""Azurite's well-known development account (public, documented by Microsoft)."""

HOST = "127.0.0.1"
_READY = "successfully started"


class AzuriteError(RuntimeError):
    """Azurite could not be found, started or stopped."""


def find_executable(service: str = "table") -> Path:
    """`azurite-<service>` from $AZURITE_<SERVICE>, the project's node_modules, or PATH."""
    name, variable = f"azurite-{service}", f"AZURITE_{service.upper()}"
    configured = os.environ.get(variable)
    if configured:
        path = Path(configured)
        if path.is_file():
            return path
        raise AzuriteError(f"{variable}={configured!r} is not a file")
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "node_modules" / ".bin" / name
        if candidate.is_file():
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise AzuriteError(
        f"{name} not found: run `make setup` (npm ci installs Azurite into node_modules), "
        f"or set {variable} to its path"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def connection_string(port: int, scheme: str = "http") -> str:
    """A connection string for the real client (the dev account, at this port)."""
    return (
        f"DefaultEndpointsProtocol={scheme};AccountName={DEV_ACCOUNT_NAME};"
        f"AccountKey={DEV_ACCOUNT_KEY};"
        f"TableEndpoint={scheme}://{HOST}:{port}/{DEV_ACCOUNT_NAME};"
    )


class Azurite:
    """One Azurite table service process. Use as a context manager, or start()/stop().

    >>> with Azurite() as azurite:
    ...     env = {"AzureWebJobsStorage": azurite.connection_string}
    """

    service = "table"
    ready = _READY
    """What Azurite prints once the service listens."""

    def __init__(
        self,
        *,
        location: Path | str | None = None,
        port: int | None = None,
        startup_timeout: float = 20.0,
        executable: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls`: (certificate, key) PEM files to serve HTTPS with, as Azure Storage does;
        the client must trust the certificate's CA (REQUESTS_CA_BUNDLE). Plain HTTP without."""
        self.location = Path(location) if location is not None else None
        self.tls = tls
        self._requested_port = port
        self.port: int | None = None
        self.startup_timeout = startup_timeout
        self.executable = executable
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # -- what clients need ---------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def connection_string(self) -> str:
        return connection_string(self._port(), self.scheme)

    @property
    def table_endpoint(self) -> str:
        return f"{self.scheme}://{HOST}:{self._port()}/{DEV_ACCOUNT_NAME}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Azurite:
        if self.running:
            return self
        attempts = 1 if (self._requested_port or self.port) else 3
        last_error: AzuriteError | None = None
        for _ in range(attempts):
            port = self.port or self._requested_port or free_port()
            command = self._command(port)  # fails at once when Azurite is not installed
            try:
                self._launch(port, command)
            except AzuriteError as error:  # e.g. the free port was taken in between: retry
                last_error = error
                continue
            self.port = port
            atexit.register(self.stop)
            return self
        assert last_error is not None
        raise last_error

    def stop(self, *, graceful: bool = True, timeout: float = 10.0) -> None:
        """Stop the process: SIGINT (Azurite saves its database), or SIGKILL when not graceful."""
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            if graceful:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
            else:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        self._discard_log()

    def _discard_log(self) -> None:
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def restart(self, *, graceful: bool = True) -> None:
        """Stop and start again on the same port and (on-disk mode) with the same data."""
        if self.location is None:
            raise AzuriteError(
                "restart() needs on-disk mode: an in-memory Azurite loses everything on stop; "
                "pass location=<directory>"
            )
        self.stop(graceful=graceful)
        self.start()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------

    def _port(self) -> int:
        if self.port is None:
            raise AzuriteError("Azurite is not started: call start() first")
        return self.port

    def _command(self, port: int) -> list[str]:
        executable = self.executable or find_executable(self.service)
        if not Path(executable).is_file():
            raise AzuriteError(f"{executable} does not exist: run `make setup` to install Azurite")
        command = [
            str(executable),
            f"--{self.service}Host",
            HOST,
            f"--{self.service}Port",
            str(port),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ]
        if self.tls:
            command += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        if self.location is None:
            command.append("--inMemoryPersistence")
        else:
            self.location.mkdir(parents=True, exist_ok=True)
            command += ["--location", str(self.location)]
        return command

    def _launch(self, port: int, command: list[str]) -> None:
        log = tempfile.NamedTemporaryFile(prefix="azurite-", suffix=".log", delete=False)  # noqa: SIM115
        self._log_path = Path(log.name)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.location or tempfile.gettempdir(),
                start_new_session=True,
            )
        except OSError as error:
            self._discard_log()
            raise AzuriteError(
                f"cannot run {command[0]}: {error}; run `make setup` to install Azurite"
            ) from error
        finally:
            log.close()
        self._process = process
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                output = self._log_tail()
                self._discard_log()
                raise AzuriteError(
                    f"Azurite exited with code {process.returncode} while starting on port "
                    f"{port}: {output}"
                )
            # Azurite prints this line once it listens (also with --silent). A bare TCP
            # connect is not enough: it would also succeed if someone else held the port.
            if self.ready in self._log_text() and _accepts_connections(port):
                return
            time.sleep(0.05)
        output = self._log_tail()
        self.stop(graceful=False)
        raise AzuriteError(
            f"Azurite did not listen on {HOST}:{port} within {self.startup_timeout:.0f} s: {output}"
        )

    def _log_text(self) -> str:
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        return self._log_text().strip()[-2000:] or "(no output)"


class AzuriteQueue(Azurite):
    """Azurite's Queue service (the follow-up queue), started and stopped like the tables."""

    service = "queue"
    ready = "successfully listens"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={DEV_ACCOUNT_NAME};"
            f"AccountKey={DEV_ACCOUNT_KEY};"
            f"QueueEndpoint={self.scheme}://{HOST}:{self._port()}/{DEV_ACCOUNT_NAME};"
        )


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m devkit.azurite`: run Azurite until Ctrl-C, print how to reach it.

    With `--port 10002` the app's `UseDevelopmentStorage=true` reaches it.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m devkit.azurite",
        description="Run Azurite's Table service on 127.0.0.1 for local development.",
    )
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--location", default=None, help="keep data in this directory")
    args = parser.parse_args(argv)
    server = Azurite(port=args.port, location=args.location)
    try:
        server.start()
    except AzuriteError as error:
        print(f"error: {error}", flush=True)
        return 1
    print(f"AzureWebJobsStorage={server.connection_string}", flush=True)
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
