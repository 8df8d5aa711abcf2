"""A throwaway two-node Slurm cluster on this machine, for testing the real `.slurm` scripts.

munged, slurmctld and two `slurmd -N <node>` run as background processes of the test session with
their config, state, spool, sockets and logs under one folder; the node names resolve to 127.0.0.1
through a line added to /etc/hosts (removed again at the end). Nothing is installed here: run
`tests/slurm/install.sh` first (Debian's slurm-wlm and munge). Needs root (slurmd runs jobs as
their owner, and /etc/hosts).

By hand:  python -m tests.slurm.cluster /tmp/dsd-cluster   # starts it, prints the SLURM_CONF line,
                                                          # stops it on Ctrl-C
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ds_diffusers.distributed import free_port

NODES = ("dsdnode1", "dsdnode2")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
TEMPLATE = Path(__file__).with_name("slurm.conf.in")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# ds-diffusers tests/slurm"


def skip_reason() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "Slurm cluster tests need root (slurmd, /etc/hosts); run them as root in CI"
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return (f"Slurm cluster tests need slurm-wlm and munge, missing: {', '.join(missing)}; "
                "install them with `bash tests/slurm/install.sh`")
    if _unresolved_nodes() and not os.access(HOSTS_FILE, os.W_OK):
        return f"Slurm cluster tests need {', '.join(NODES)} in {HOSTS_FILE}, which is not writable here"
    return None


def _unresolved_nodes() -> list[str]:
    unresolved = []
    for node in NODES:
        try:
            socket.gethostbyname(node)
        except OSError:
            unresolved.append(node)
    return unresolved


def poll(what: str, check, timeout_s: float, interval_s: float = 0.5, on_timeout=lambda: ""):
    """Call `check` until it returns something truthy; raise after `timeout_s` (never waits forever)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout_s:.0f} s. {on_timeout()}")
        time.sleep(interval_s)


class LocalCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2) -> None:
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self._hosts_line: str | None = None

    # --- life cycle -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> "LocalCluster":
        try:
            self._write_files()
            self._map_node_names()
            self._start("munged", ["munged", "-F", "--force", f"--socket={self.root}/munge/munge.socket",
                                   f"--key-file={self.root}/munge/munge.key", f"--pid-file={self.root}/munge/munged.pid",
                                   f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munge/munged.seed"])
            poll("munged socket", lambda: (self.root / "munge" / "munge.socket").exists(), timeout_s,
                 on_timeout=lambda: self.logs("munged"))
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.root / "slurm.conf")])
            poll("slurmctld answering", lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout_s,
                 on_timeout=lambda: self.logs("slurmctld"))
            for node in NODES:
                self._start(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.root / "slurm.conf")])
            self.wait_nodes_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30) -> None:
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.daemons):
            self.run("scancel", "--full", "--user=root", check=False)
            try:
                poll("jobs gone", lambda: not self.run("squeue", "-h", check=False).stdout.strip(), timeout_s)
            except TimeoutError:
                pass  # the daemons go down anyway; the job steps die with their slurmd
        for name, proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons.clear()
        self._unmap_node_names()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- helpers for tests ------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_nodes_idle(self, timeout_s: float = 60) -> None:
        poll("both nodes idle", lambda: all(self.node_states().get(n) == "idle" for n in NODES), timeout_s,
             on_timeout=lambda: f"sinfo: {self.node_states()}\n{self.logs()}")

    @contextlib.contextmanager
    def drained(self, node: str) -> Iterator[None]:
        """`node` takes no new job inside the block (a running one goes on); it is given back, idle,
        at the end whatever happens, so later tests see both nodes."""
        self.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=dsd-test")
        try:
            yield
        finally:
            self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            self.wait_nodes_idle()

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return f"{fields.get('JobState', 'UNKNOWN')} restarts={fields.get('Restarts', '?')}"

    def logs(self, *names: str, tail: int = 40) -> str:
        """The last lines of the daemons' logs, for failure messages."""
        files = sorted((self.root / "log").glob("*.log")) + sorted((self.root / "log").glob("*.stdout"))
        chosen = [f for f in files if not names or any(n in f.name for n in names)]
        parts = []
        for path in chosen:
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- internals --------------------------------------------------------------------------------
    def _write_files(self) -> None:
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses keys and sockets in group/world-writable places.
        for sub in ("", "munge"):
            os.chmod(self.root / sub, 0o755 if sub == "" else 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        values = {
            "ROOT": str(self.root), "CONTROL_HOST": socket.gethostname().split(".")[0], "CTLD_PORT": free_port(),
            "NODE1": NODES[0], "NODE2": NODES[1], "NODE1_PORT": free_port(), "NODE2_PORT": free_port(),
            "CPUS": self.cpus_per_node,
        }
        text = TEMPLATE.read_text()
        for name, value in values.items():
            text = text.replace(f"@{name}@", str(value))
        (self.root / "slurm.conf").write_text(text)

    def _map_node_names(self) -> None:
        unresolved = _unresolved_nodes()
        if unresolved:
            self._hosts_line = f"127.0.0.1 {' '.join(unresolved)} {HOSTS_MARK}\n"
            with HOSTS_FILE.open("a") as hosts:
                hosts.write(self._hosts_line)

    def _unmap_node_names(self) -> None:
        if self._hosts_line is None:
            return
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        # /etc/hosts is often a bind mount in containers: rewrite in place, never replace the file.
        HOSTS_FILE.write_text("".join(line for line in lines if line != self._hosts_line))
        self._hosts_line = None

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.daemons.append((name, proc))


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "/tmp/dsd-cluster").resolve()
    reason = skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with LocalCluster(root) as cluster:
        print(f"cluster up: export SLURM_CONF={cluster.env['SLURM_CONF']}   (Ctrl-C stops it)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
