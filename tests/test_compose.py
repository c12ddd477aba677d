"""No Docker engine here: check that docker-compose.yml parses and runs commands the CLI has."""
from pathlib import Path

import yaml

from streams.cli import build_parser
from streams.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_and_commands_exist():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "worker", "refresher"} <= set(services)
    for name in ("kafka", "redis", "worker", "refresher"):
        assert "healthcheck" in services[name], name
    parser = build_parser()
    for name in ("worker", "refresher"):
        args = parser.parse_args(services[name]["command"])  # exits on an unknown command
        assert args.command == name
        env = services[name]["environment"]
        known = {f.upper() for f in Settings.__dataclass_fields__}
        assert set(env) <= known, set(env) - known
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert kafka_env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == 0


def test_dockerfile_entrypoint_is_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "streams"]' in text
