"""Mistakes a user can fix end in one line saying what is wrong, and exit status 2; `--debug` adds the traceback."""

import argparse
import os
import subprocess
import sys

import pytest

from streams.cli import build_parser


def _sluice(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=os.environ | env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_an_invalid_setting_is_one_line_without_a_traceback() -> None:
    result = _sluice("config", SLUICE_WORKER__MAX_BATCH_SIZE="many")
    assert result.returncode == 2
    assert "SLUICE_WORKER__MAX_BATCH_SIZE" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["config"], {"SLUICE_WORKER__MAX_BATCH_SIZE": "0"}, "SLUICE_WORKER__MAX_BATCH_SIZE"),
        (["config"], {"SLUICE_SIMULATOR__CAMERA_FPS": "-1"}, "SLUICE_SIMULATOR__CAMERA_FPS"),
        (["config"], {"SLUICE_SINK__QUERY_PORT": "70000"}, "SLUICE_SINK__QUERY_PORT"),
        (["config"], {"SLUICE_KAFKA__TOPICS__FRAMES_PARTITIONS": "0"}, "FRAMES_PARTITIONS"),
        (["sink"], {"SLUICE_KAFKA__BOOTSTRAP_SERVERS": "kafka:abc"}, "is not host:port"),
        (["sink"], {"SLUICE_CLICKHOUSE__DSN": "http://127.0.0.1:1"}, "cannot open ClickHouse at http://127.0.0.1:1"),
    ],
    ids=["batch-size-0", "negative-fps", "port-out-of-range", "no-partitions", "bootstrap-typo", "clickhouse-closed"],
)
def test_configuration_mistakes_end_in_one_clear_line(args: list[str], env: dict[str, str], says: str) -> None:
    result = _sluice(*args, **env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "Unclosed" not in result.stderr and "never retrieved" not in result.stderr, result.stderr


def test_debug_shows_the_traceback() -> None:
    result = _sluice("--debug", "config", SLUICE_WORKER__MAX_BATCH_SIZE="many")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_a_missing_model_names_what_to_fix(tmp_path: object) -> None:
    result = _sluice("worker", "--modality", "frame", SLUICE_ENGINE__FRAME_MODEL="no_such_model")
    assert result.returncode == 2
    assert "no model 'no_such_model'" in result.stderr and "Traceback" not in result.stderr


def test_config_never_prints_a_password() -> None:
    result = _sluice("config", SLUICE_CLICKHOUSE__DSN="https://bob:hunter2@ch:8443",
                     SLUICE_REDIS__URL="redis://:s3cret@redis:6379/0", SLUICE_KAFKA__SASL_PASSWORD="k4fka")  # fmt: skip
    assert result.returncode == 0
    for secret in ("hunter2", "s3cret", "k4fka"):
        assert secret not in result.stdout
    assert "https://bob:***@ch:8443" in result.stdout, "what the DSN points at stays visible"


def test_every_argument_says_what_it_is_for_and_the_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    def undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += undocumented(sub, f"{path} {name}")
            elif action.help is None:
                found.append(f"{path} {action.dest}")
        return found

    assert undocumented(build_parser(), "sluice") == []
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("sluice ")


def test_an_error_naming_an_extra_keeps_its_brackets_on_one_line() -> None:
    """rich would read `sluice[tensorrt]` as markup and print `sluice`; the message is escaped."""
    result = _sluice("worker", "--modality", "frame", SLUICE_ENGINE__KIND="tensorrt", SLUICE_ENGINE__DEVICE="cuda")
    assert result.returncode == 2
    assert "sluice[tensorrt]" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
