"""The single, process-wide job manager: one study at a time, as a subprocess of ``python -m core study``.

Imported modules are shared by all Panel sessions of a server, so every browser sees the same job.
A second launch while one runs is refused with a message; so is a launch while another dashboard server
sharing the store runs one (the store's ``.launch.lock``, see ``acquire_lock``). Cancelling writes the run's
``CANCEL`` file (``Run.request_cancel()``, which the CLI honours between steps) and sends SIGTERM after a grace
period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.config import REPO_ROOT, default_cache_dir
from core.fsio import atomic_write_json
from core.store import LIVE_STATUSES, Run, RunStore, Status, check_run_id, new_run_id

CANCEL_GRACE_S = 10.0
ENDED = (Status.FINISHED, Status.FAILED, Status.CANCELLED)
LOCK_NAME = ".launch.lock"  # in the run store; a dot name, so never listed as a run


@dataclass
class Job:
    run_id: str
    runs_dir: Path
    argv: list[str]
    proc: subprocess.Popen
    out_path: Path
    started: float = field(default_factory=time.time)
    returncode: int | None = None
    cancel_requested: bool = False
    ended: float | None = None

    @property
    def run(self) -> Run:
        return Run(self.runs_dir / self.run_id)

    @property
    def running(self) -> bool:
        return self.returncode is None

    def state(self) -> str:
        if self.running:
            return "cancelling" if self.cancel_requested else Status.RUNNING
        try:
            status = self.run.info.status
        except Exception:  # no or damaged run.json: the exit code decides
            status = None
        if status in ENDED:
            return status
        if self.cancel_requested:
            return Status.CANCELLED
        return Status.FINISHED if self.returncode == 0 else Status.FAILED

    def output_tail(self, n: int = 15) -> list[str]:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8000))
                return f.read().decode(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def log_tail(self, n: int = 15) -> list[str]:
        """The run's log.txt, else the subprocess output (e.g. an argument error before the run exists)."""
        return self.run.log_tail(n) or self.output_tail(n)


class JobManager:
    def __init__(self):
        self._lock = threading.Lock()
        self.current: Job | None = None

    def busy(self) -> bool:
        return self.current is not None and self.current.running

    def launch(self, args: list[str], runs_dir, run_id: str | None = None, preset: str = "custom") -> tuple[Job | None, str]:
        """Start ``python -m core study ARGS --run-id ID --runs-dir DIR``; (job, message) or (None, reason)."""
        runs_dir = Path(runs_dir)
        with self._lock:
            if self.busy():
                return None, (f"A study is already running ({self.current.run_id}). One study at a time: "
                              "wait for it to finish or cancel it.")
            run_id = check_run_id(run_id or new_run_id(preset))
            if (runs_dir / run_id).exists():
                return None, f"run {run_id} already exists"
            why = acquire_lock(runs_dir, run_id)
            if why:
                return None, why
            try:
                argv, proc, out_path = self._start(args, runs_dir, run_id)
            except BaseException:
                release_lock(runs_dir, os.getpid())
                raise
            hand_lock(runs_dir, proc.pid, run_id)
            job = Job(run_id=run_id, runs_dir=runs_dir, argv=argv, proc=proc, out_path=out_path)
            self.current = job
        threading.Thread(target=self._wait, args=(job,), daemon=True, name=f"job-{run_id}").start()
        return job, f"Started {run_id}"

    @staticmethod
    def _start(args, runs_dir: Path, run_id: str):
        out_dir = default_cache_dir() / "launcher"
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / f"{run_id}.out"
        argv = [sys.executable, "-m", "core", "study", *args, "--run-id", run_id, "--runs-dir", str(runs_dir)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, cwd=str(REPO_ROOT), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return argv, proc, out_path

    def _wait(self, job: Job) -> None:
        rc = job.proc.wait()
        release_lock(job.runs_dir, job.proc.pid, os.getpid())  # before the job reads as ended
        job.ended = time.time()
        job.returncode = rc

    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> str:
        job = self.current
        if job is None or not job.running:
            return "No study is running."
        job.cancel_requested = True
        try:
            if job.run.path.exists():
                job.run.request_cancel()
        except OSError:
            pass

        def terminate():
            if job.running:
                try:
                    os.killpg(job.proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    job.proc.terminate()

        t = threading.Timer(grace_s, terminate)
        t.daemon = True
        t.start()
        return f"Cancelling {job.run_id} (SIGTERM in {grace_s:.0f} s if it has not stopped)."


#: The one job manager of this server process.
MANAGER = JobManager()


# ----------------------------------------------------------------------------------- the store's launch lock
def lock_path(runs_dir) -> Path:
    return Path(runs_dir) / LOCK_NAME


def acquire_lock(runs_dir, run_id: str) -> str | None:
    """Take ``<runs_dir>/.launch.lock`` (O_CREAT|O_EXCL, holding pid, host and run id): None when taken, else
    why not. A lock whose pid is gone on this host is stale and removed; one from another host, or one that
    cannot be read, is respected. Fails closed: any error is a refusal."""
    path = lock_path(runs_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                if not _stale(holder):
                    return _held_message(path, holder)
                _remove_if_unchanged(path, holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_lock_body(os.getpid(), run_id), f)
            return None
        return f"could not take the launch lock {path} (it keeps reappearing)"
    except Exception as e:
        return f"could not take the launch lock {path} ({type(e).__name__}: {e})"


def hand_lock(runs_dir, pid: int, run_id: str) -> None:
    """The lock now names the study's process (it outlives this server if the server stops)."""
    try:
        atomic_write_json(lock_path(runs_dir), _lock_body(pid, run_id), indent=None)
    except OSError:
        pass  # the lock still names this server: released when the study ends (or stale once the server is gone)


def release_lock(runs_dir, *pids: int) -> None:
    """Remove the lock if it is this host's lock for one of ``pids``."""
    path = lock_path(runs_dir)
    holder = read_lock(path)
    if holder and holder.get("host") == socket.gethostname() and holder.get("pid") in pids:
        _remove_if_unchanged(path, holder)


def read_lock(path) -> dict | None:
    try:
        holder = json.loads(Path(path).read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _lock_body(pid: int, run_id: str) -> dict:
    return {"pid": pid, "host": socket.gethostname(), "run_id": run_id, "since": time.time()}


def _stale(holder: dict | None) -> bool:
    return bool(holder) and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))


def _remove_if_unchanged(path: Path, holder: dict) -> None:
    if read_lock(path) == holder:  # not a fresh lock another server took meanwhile
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _held_message(path: Path, holder: dict | None) -> str:
    if not holder:
        return (f"Another dashboard is starting a study in this store (the launch lock {path} is being written or "
                "is unreadable). One study at a time: try again shortly, or delete that file if no study runs.")
    return (f"A study started by another dashboard is running in this store ({holder.get('run_id')}, pid "
            f"{holder.get('pid')} on {holder.get('host')}). One study at a time: wait for it to finish, or delete "
            f"{path} if it is not running.")


def running_elsewhere(runs_dir, exclude: str | None = None) -> list[tuple[str, dict]]:
    """Studies running in this store that this dashboard did not start (``wbc study`` in a terminal, another
    dashboard): (run_id, progress) for each run whose effective status (core.store.effective_status: process
    alive, heartbeat fresh) is running or queued."""
    return [(e.run_id, e.run.progress) for e in RunStore(runs_dir).list()
            if e.run_id != exclude and e.status in LIVE_STATUSES]


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
