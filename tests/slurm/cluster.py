"""A real Slurm on localhost for the tests: munged, slurmctld and two slurmd "nodes" (n1, n2) on this one host.

Everything the daemons write (config, state, spool, logs, sockets, pid files) lives under one temporary folder; the
daemons run in the foreground as children of this process, so `stop()` ends exactly the processes it started. The
only change outside that folder is two lines in /etc/hosts (`127.0.0.1 n1 n2`, so that a node name, as Slurm hands
it to a job, resolves like on a cluster), removed again by `stop()`.

What this machine needs, learnt the hard way:
  - no systemd and no cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting;
  - the node line comes from `slurmd -C` (CPUs, sockets, memory as this host reports them);
  - two nodes on one host: two NodeNames with the same NodeHostname, NodeAddr=127.0.0.1 and distinct Ports,
    started as `slurmd -N n1` and `slurmd -N n2`;
  - a requeued job is held for AuthInfo's cred_expire seconds (120 by default), lowered here to keep tests short;
  - the main scheduler runs every 60 s by default; sched_interval=1 makes pending jobs start at once.

Run it by hand to try the templates:  python -m tests.slurm.cluster   (prints the SLURM_CONF to export; Ctrl-C stops)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun"]
NODES = ("n1", "n2")
HOSTS_MARK = "# llm tests/slurm"
CRED_EXPIRE = 10  # seconds a requeued job waits before it may start again


class Unavailable(Exception):
    """This machine cannot run a local Slurm (not root, or the packages cannot be installed)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(log=print) -> None:
    """Install the Debian packages if a binary is missing. Raises Unavailable where that cannot be done."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The packages' maintainer scripts would start the distribution's own daemons (system-wide config, /run/munge);
    # a policy-rc.d that denies every start keeps them down, so only our daemons run. Removed again if it is ours.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            log("tests/slurm: " + " ".join(cmd))
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise Unavailable(f"`{' '.join(cmd)}` failed (no package access?): {result.stderr.strip()[-800:]}")
    finally:
        if ours:
            policy.unlink(missing_ok=True)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise Unavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} still missing")


class LocalSlurm:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="llm-slurm-"))
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        # Nothing of an enclosing Slurm job (when the tests themselves run in one) may leak into ours.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self._hosts_added = False

    # ---------------------------------------------------------------------------------------------------- setup
    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        # "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105" (then "UpTime=..." on the next line)
        hardware = " ".join(w for w in probe.split("\n")[0].split() if not w.startswith("NodeName="))
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(mode=0o700, exist_ok=True)
        lines = [
            "ClusterName=llmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (there is no accounting database)
            "KillWait=15",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
        ]
        for name in NODES:
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} {hardware}")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _add_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if HOSTS_MARK not in text:
            # Written in place: /etc/hosts is often a bind mount that cannot be replaced by a rename.
            with open(hosts, "a") as f:
                f.write(("" if text.endswith("\n") else "\n") + f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")
            self._hosts_added = True

    def _remove_hosts(self) -> None:
        if self._hosts_added:
            hosts = Path("/etc/hosts")
            kept = [line for line in hosts.read_text().splitlines(keepends=True) if HOSTS_MARK not in line]
            with open(hosts, "w") as f:
                f.write("".join(kept))
            self._hosts_added = False

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        log.close()

    def _wait(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.logs())

    def start(self) -> LocalSlurm:
        if os.geteuid() != 0:
            raise Unavailable("a local Slurm needs root (munged and slurmd run as root here)")
        self._write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))  # a fresh key: nothing shared with a system-wide munge
        key.chmod(0o600)
        try:
            self._add_hosts()
            m = self.root / "munge"
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                                   f"--seed-file={m}/munged.seed"])
            self._wait("munged", self.munge_socket.exists)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self._ok(["scontrol", "ping"], "UP"))
            for name in NODES:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
            self._wait("the nodes to be idle", lambda: self._idle_nodes() == len(NODES))
        except BaseException:
            self.stop()
            raise
        return self

    # ---------------------------------------------------------------------------------------------------- use
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, timeout=kw.pop("timeout", 60), **kw)

    def sbatch(self, script: Path, args: list = (), sbatch_args: list = (), cwd: Path | None = None, **env) -> str:
        """Submit a batch script as a user would (from `cwd`, with extra environment); returns the job id."""
        result = self.run("sbatch", "--parsable", *map(str, sbatch_args), str(script), *map(str, args), cwd=cwd,
                          env={k: str(v) for k, v in env.items()}, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def _ok(self, cmd: list[str], text: str) -> bool:
        r = self.run(*cmd, check=False)
        return r.returncode == 0 and text in r.stdout

    def _idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return sum(1 for state in out[1::2] if state == "idle")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for word in out.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                           "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"),
                 timeout: float = 300, poll: float = 1.0) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {self.job(job_id)}\n" + self.logs())

    def logs(self, tail: int = 2500) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(out)

    # ---------------------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop the daemons this object started (slurmds, then slurmctld, then munged), and only those.

        Jobs still running on this private cluster are cancelled first: their slurmstepd processes outlive slurmd.
        """
        if self.procs and all(p.poll() is None for p in self.procs):
            if self.run("scancel", "--full", "--partition=debug", check=False).returncode == 0:
                deadline = time.time() + 60
                while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        self._remove_hosts()


if __name__ == "__main__":
    ensure_installed()
    cluster = LocalSlurm().start()
    print(f"export SLURM_CONF={cluster.conf}\n(Ctrl-C or SIGTERM stops the daemons)", flush=True)

    def _exit(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)  # also when started in the background, where SIGINT comes ignored
    try:
        signal.pause()
    finally:
        cluster.stop()
