"""A fork server for the fuzz suite: one worker process pays for the imports (qtool.cli, torch,
transformers) once, then runs each `qtool ...` command line in a forked child.

A subprocess per mutant costs 2-3 s of imports on a 2-core machine; a fork costs milliseconds. The
child runs qtool's real console entry point (``qtool.cli:run``) with stdout/stderr redirected to
files, an address-space limit, and the worker's timeout; the worker reports the exit status, whether
it was killed for running too long, and the child's peak RSS (os.wait4's rusage).

The worker is started by :class:`ForkServer` (pytest side) as ``python -m tests._fuzz_server`` and
speaks one JSON object per line: requests on its stdin, replies on a pipe of its own (its number in
$QTOOL_FUZZ_REPLY_FD), so that nothing the CLI prints can end up in the protocol.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Set before torch is imported: a process forked after an OpenMP pool exists can hang in the child,
# and the children share two cores with other work anyway.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}
# Mutants must never reach the network: a mangled path could otherwise look like a Hub id.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1", "COLUMNS": "160"}
REPLY_FD_ENV = "QTOOL_FUZZ_REPLY_FD"
POLL_S = 0.01
TERM_GRACE_S = 10


@dataclass
class RunResult:
    rc: int | None            # exit status; None when a signal ended the child
    signal: int | None        # the signal that ended it (SIGKILL after a timeout)
    timed_out: bool
    wall_s: float
    peak_rss_mb: float        # includes the worker's own footprint, inherited at fork
    cpu_s: float              # user + system time of the child (wall time depends on the machine's load)
    stdout: bytes
    stderr: bytes


# ------------------------------------------------------------------ worker side
def _warm_imports() -> None:
    """Import what the commands import lazily, so each child starts with it loaded."""
    import qtool.cli  # noqa: F401
    import qtool.evaluation  # noqa: F401
    import qtool.inspect  # noqa: F401
    import qtool.pipeline  # noqa: F401
    import qtool.recipes  # noqa: F401
    import qtool.report  # noqa: F401
    import qtool.sources.resolve  # noqa: F401
    import torch  # noqa: F401
    import transformers
    for module in ("qtool.evaluation.model", "qtool.evaluation.perplexity", "qtool.sources.gguf",
                   "qtool.sources.local", "qtool.sources.hf", "qtool.sinks.gguf", "qtool.sinks.bnb",
                   "qtool.sinks.compressed", "qtool.tokenizer", "qtool.gguf_tokenizer"):
        try:
            __import__(module)
        except ImportError:
            pass  # a module renamed by a concurrent refactor: the child imports what it needs
    # transformers resolves these lazily; touching them imports the modeling and tokenizer code.
    transformers.LlamaForCausalLM, transformers.LlamaConfig, transformers.PreTrainedTokenizerFast  # noqa: B018


def _child(request: dict) -> None:
    """In the forked child: become a fresh `qtool ARGS` process as far as the CLI can tell."""
    code = 1
    try:
        os.setpgid(0, 0)
        # Signal handlers are left as importing qtool set them: the same as in a fresh `qtool` process.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        cpu_limit = request.get("cpu_limit_s")
        if cpu_limit:
            # A load-independent bound on work: SIGXCPU after this much CPU time, whatever the wall clock.
            resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_limit), int(cpu_limit) + 5))
        extra = request.get("address_space_extra_bytes")
        if extra:
            # Relative to what the worker has mapped already (torch reserves a lot of address space).
            limit = worker_address_space_bytes() + extra
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.chdir(request["cwd"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        for fd in (stdin, stdout, stderr):
            os.close(fd)
        os.close(int(os.environ[REPLY_FD_ENV]))
        import torch

        torch.set_num_threads(1)
        from qtool import cli

        sys.argv = ["qtool", *request["args"]]
        try:
            cli.run()
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:  # sys.exit("message"): Python prints it and exits 1
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the real interpreter would print for an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            if request.get("dump_modules"):
                Path(request["dump_modules"]).write_text("\n".join(sorted(sys.modules)))
        except BaseException:
            pass
        os._exit(code & 0xFF)


def _run_one(request: dict) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request)
    deadline = started + request["timeout_s"]
    timed_out = False
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited:
            break
        if time.monotonic() > deadline and not timed_out:
            # SIGTERM first, as a user's `timeout` would: qtool must clean up its staged output.
            timed_out = True
            deadline += TERM_GRACE_S
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(POLL_S)
    wall_s = time.monotonic() - started
    try:  # anything the child started in its process group goes with it
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return {"rc": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": timed_out, "wall_s": wall_s, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def serve() -> None:
    _warm_imports()
    replies = os.fdopen(int(os.environ[REPLY_FD_ENV]), "w", buffering=1)
    replies.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if "import_modules" in request:
            replies.write(json.dumps({"imported": _import_listed(Path(request["import_modules"]))}) + "\n")
        else:
            replies.write(json.dumps(_run_one(request)) + "\n")


def _import_listed(listing: Path) -> int:
    """Import, in the worker, the modules a child's run ended up with (written by dump_modules), so
    later children start with them loaded; a fresh `qtool` process would import them all the same."""
    import importlib

    count = 0
    for name in listing.read_text().split():
        if name in sys.modules or name.startswith(("__main__", "tests")):
            continue
        try:
            importlib.import_module(name)
            count += 1
        except BaseException:
            pass  # private or platform-specific submodules: the child imports them itself if needed
    return count


# ------------------------------------------------------------------ pytest side
class ForkServer:
    """Starts the worker; :meth:`run` sends it one command line and waits for the verdict."""

    def __init__(self, repo_root: Path, env: dict[str, str] | None = None, start_timeout_s: float = 180) -> None:
        read_fd, write_fd = os.pipe()
        full_env = {**os.environ, **THREAD_ENV, **OFFLINE_ENV, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), full_env.get("PYTHONPATH")]))
        full_env[REPLY_FD_ENV] = str(write_fd)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests._fuzz_server"], cwd=repo_root, env=full_env, stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")
        ready = self._read_reply(start_timeout_s)
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"fuzz worker did not start: {self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        self._process.kill()
        return (self._process.stderr.read() or "")[-2000:]

    def _read_reply(self, timeout_s: float) -> dict | None:
        ready, _, _ = select.select([self._replies], [], [], timeout_s)
        if not ready:
            return None
        line = self._replies.readline()
        return json.loads(line) if line else None

    def _send(self, request: dict) -> None:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()

    def warm(self, commands: list[list[str]], cwd: Path) -> list[Path]:
        """Run each command once and import, in the worker, every module those runs imported; returns
        the module listings, for :meth:`import_modules` of other servers."""
        listings = []
        for index, args in enumerate(commands):
            listing = cwd / f"modules-{index}.txt"
            self.run(args, cwd=cwd, stdout_path=cwd / f"warm-{index}.out", stderr_path=cwd / f"warm-{index}.err",
                     timeout_s=600, dump_modules=listing)
            if listing.exists():
                self.import_modules(listing)
                listings.append(listing)
        return listings

    def import_modules(self, listing: Path) -> None:
        self._send({"import_modules": str(listing)})
        if self._read_reply(600) is None:
            raise RuntimeError(f"fuzz worker stopped answering: {self._stderr_tail()}")

    def run(self, args: list[str], *, cwd: Path, stdout_path: Path, stderr_path: Path, timeout_s: float,
            cpu_limit_s: float | None = None, address_space_extra_bytes: int | None = None,
            dump_modules: Path | None = None) -> RunResult:
        self._send({"args": args, "cwd": str(cwd), "stdout": str(stdout_path), "stderr": str(stderr_path),
                    "timeout_s": timeout_s, "cpu_limit_s": cpu_limit_s,
                    "address_space_extra_bytes": address_space_extra_bytes,
                    "dump_modules": str(dump_modules) if dump_modules else None})
        # The worker kills the child at timeout_s; the margin covers the kill and the reply.
        reply = self._read_reply(timeout_s + 60)
        if reply is None:
            raise RuntimeError(f"fuzz worker stopped answering: {self._stderr_tail()}")
        return RunResult(rc=reply["rc"], signal=reply["signal"], timed_out=reply["timed_out"],
                         wall_s=reply["wall_s"], peak_rss_mb=reply["peak_rss_mb"], cpu_s=reply["cpu_s"],
                         stdout=stdout_path.read_bytes() if stdout_path.exists() else b"",
                         stderr=stderr_path.read_bytes() if stderr_path.exists() else b"")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._replies.close()


def worker_address_space_bytes() -> int:
    """This process's current virtual size (the worker's, when called there)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    serve()
