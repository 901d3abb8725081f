"""A real Slurm on localhost (tests/slurm/cluster.py) for the whole test session, and how jobs are submitted to it.

The fixture installs the Debian packages when they are missing (apt-get; root), starts munged, slurmctld and two
slurmd nodes under a temporary folder, and stops exactly those daemons at the end. Where the machine cannot run
them (not root, no apt-get, no package access) the Slurm tests are skipped with that reason; LLM_REQUIRE_SLURM=1
turns the skip into a failure, for CI machines that must run them.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, Unavailable, ensure_installed


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except Unavailable as e:
        if os.environ.get("LLM_REQUIRE_SLURM") == "1":
            pytest.fail(f"LLM_REQUIRE_SLURM=1 but no local Slurm: {e}")
        pytest.skip(f"no local Slurm cluster: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def env_setup(tmp_path_factory) -> Path:
    """The LLM_ENV_SETUP hook the jobs source: this interpreter's environment, one thread per process."""
    path = tmp_path_factory.mktemp("env") / "env.sh"
    bins = dict.fromkeys([str(Path(sys.executable).parent), sysconfig.get_path("scripts")])
    path.write_text(f'export PATH="{":".join(bins)}:$PATH"\nexport OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1\n')
    return path

