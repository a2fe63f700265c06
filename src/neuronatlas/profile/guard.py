"""What keeps a profile's work safe: a lock on the output folder and signals that stop it cleanly.

- :class:`OutputLock`: one profile per output folder. The lock file (:data:`neuronatlas.files.LOCK_FILE`)
  is created atomically (O_CREAT | O_EXCL) and holds the owner's PID and host; a lock left by a dead
  process of this host is taken over (with a message), any other refuses the second run in one line.
  Under torchrun rank 0 takes it for the whole job (the other ranks write only where rank 0 allows).
- :class:`StopSignals`: SIGINT and SIGTERM set a flag instead of raising in the middle of a batch;
  the run checks it between batches, writes a checkpoint and raises :class:`ProfileInterrupted`
  (exit status 128 + the signal's number).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ..errors import NeuronAtlasError
from ..files import LOCK_FILE


class ProfileInterrupted(KeyboardInterrupt):
    """A profile stopped by SIGINT or SIGTERM after writing its checkpoint; ``exit_status`` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class StopSignals:
    """While entered (in the main thread): SIGINT and SIGTERM only record that the run must stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may handle signals
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _record(self, signum, frame) -> None:
        self.signum = signum

    def interrupted(self, where: str) -> ProfileInterrupted:
        return ProfileInterrupted(f"interrupted: {where}; run the same command with --resume", self.signum or signal.SIGINT)


class OutputLock:
    """The lock file of one output folder, held from before any work until the end (errors included)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.created_folder = False
        self.held = False
        self.took_over = False  # the lock of a dead run was taken over

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.out.exists():
            try:
                self.out.mkdir(parents=True)
            except FileExistsError:
                pass  # another process made it first: the lock decides
            except OSError as error:
                raise NeuronAtlasError(f"cannot create --out {self.out} ({error.strerror}); choose another --out") from None
            else:
                self.created_folder = True
        for _attempt in range(3):
            if self._create():
                self.held = True
                return
            owner = self._owner()
            if not self._is_stale(owner):
                self._give_up_folder()
                raise self._busy(owner)
            self._take_over(owner)
        self._give_up_folder()
        raise NeuronAtlasError(f"cannot take the lock {self.path}: other profiles keep taking it; choose another --out")

    def check(self) -> None:
        """Refuse, without writing anything, when a live process holds the lock."""
        if self.path.exists():
            owner = self._owner()
            if not self._is_stale(owner):
                raise self._busy(owner)

    def _busy(self, owner: tuple[int | None, str]) -> NeuronAtlasError:
        pid, host = owner
        return NeuronAtlasError(
            f"{self.out} is being written by another profile (PID {pid} on {host}); wait for it to end or "
            f"choose another --out (if that process is gone, delete {self.path})"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        self._give_up_folder()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        except OSError as error:
            self._give_up_folder()
            raise NeuronAtlasError(f"cannot write in --out {self.out} ({error.strerror}); choose another --out") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True

    def _owner(self) -> tuple[int | None, str]:
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):  # being written this instant, or damaged: treat as held
            return None, "an unknown host"

    def _is_stale(self, owner: tuple[int | None, str]) -> bool:
        pid, host = owner
        if pid is None or host != socket.gethostname():
            return False  # another machine's process cannot be checked from here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _take_over(self, owner: tuple[int | None, str]) -> None:
        # Renamed away first: of two processes taking over at once, only one rename succeeds.
        try:
            os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}"))
        except FileNotFoundError:
            return
        self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}").unlink(missing_ok=True)
        self.took_over = True
        print(f"neuronatlas: taking over the lock of {self.out} left by PID {owner[0]} (no longer running)",
              file=sys.stderr)

    def _give_up_folder(self) -> None:
        """Remove the output folder this lock created if nothing was written into it."""
        if self.created_folder:
            try:
                self.out.rmdir()
            except OSError:  # not empty: the run wrote into it (a checkpoint): keep it
                pass
            self.created_folder = False
