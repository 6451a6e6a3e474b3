"""The docker files, checked without a Docker engine (none runs where the tests run)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_dockerfile_copies_what_exists_and_runs_tuner():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:\S+cuda\S+", text, re.M), "a CUDA-capable PyTorch base"
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
    assert 'pip install ".[postgres]"' in text and 'ENTRYPOINT ["tuner"]' in text


def test_compose_has_database_workers_and_dashboard():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"db", "leader", "worker", "dashboard"} <= set(services)
    db = services["db"]
    assert db["image"].startswith("postgres:") and "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in db["volumes"])
    for name in ("leader", "worker", "dashboard"):
        service = services[name]
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
        assert "studies:/app/studies" in service["volumes"], "one artifact store and cache for all"
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert "--n-trials" in services["leader"]["command"][0] and "--join" not in services["leader"]["command"][0]
    assert "--join" in services["worker"]["command"][0] and services["worker"]["restart"] == "on-failure"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "tuner dashboard" in services["dashboard"]["command"][0] and "8080:8080" in services["dashboard"]["ports"]
    assert "POSTGRES_PASSWORD:?" in (ROOT / "docker" / "compose.yaml").read_text(), "no default password"


def test_every_tuner_command_in_the_compose_file_is_one_tuner_accepts():
    """Each `tuner <command> --flag` the services run exists in today's CLI: a renamed flag fails here, not
    in a user's container."""
    from tests.conftest import invoke

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    calls = []
    for service in compose["services"].values():
        for line in service.get("command", []):
            calls += re.findall(r"tuner (\w+)((?: +--?[\w-]+(?: +(?!--)\S+)?)*)", line)
    assert {command for command, _ in calls} == {"optimize", "trials", "dashboard"}, calls
    for command, args in calls:
        help_text = invoke(command, "--help").output
        for flag in re.findall(r"(--[\w-]+)", args):
            assert flag in help_text, f"tuner {command} has no {flag}"
