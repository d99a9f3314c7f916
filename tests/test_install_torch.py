"""asv's first install step picks a CPU-only torch on a Linux machine without a GPU (issue 11, item 8)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import install_torch  # noqa: E402

LISTING = """torch (2.15.0)
Available versions: 2.15.0, 2.14.1, 2.13.0+cpu, 2.13.0, 2.12.1+cpu, 2.0.1+cpu, 3.0.0+cpu, 2.13.0+cu121
  INSTALLED: 2.13.0+cpu
"""


def test_cpu_versions_keep_cpu_builds_in_vaebenchs_range_newest_first():
    assert install_torch.cpu_versions(LISTING) == ["2.13.0+cpu", "2.12.1+cpu"]
    assert install_torch.cpu_versions("ERROR: No matching distribution found for torch") == []


@pytest.mark.parametrize("forced,platform,gpu,expected", [
    ("", "linux", False, "cpu"), ("", "linux", True, "cuda"), ("", "darwin", False, "default"),
    ("cuda", "linux", False, "cuda"), ("CPU", "linux", True, "cpu"),
])
def test_flavour(monkeypatch, forced, platform, gpu, expected):
    monkeypatch.setenv("VAEBENCH_TORCH", forced)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(install_torch, "has_gpu", lambda: gpu)
    assert install_torch.flavour() == expected


def test_no_cpu_build_stops_instead_of_installing_cuda(monkeypatch):
    monkeypatch.setattr(install_torch, "flavour", lambda: "cpu")
    monkeypatch.setattr(install_torch.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="Available versions: 2.14.1, 2.13.0\n", stderr="")

    monkeypatch.setattr(install_torch.subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match="no CPU-only torch build"):
        install_torch.main([])
    assert len(calls) == 1 and "index" in calls[0]          # only looked; installed nothing


def test_asv_conf_runs_the_script_first():
    text = (REPO / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    assert conf["install_command"][0] == "in-dir={env_dir} python {conf_dir}/bench/install_torch.py"
