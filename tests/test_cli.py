"""CLI users see one-line errors, never a traceback."""

import subprocess
import sys


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "consortia.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def test_unreachable_coordinator_is_one_line(tmp_path):
    r = run("job", "status", "1", "--coordinator", "http://127.0.0.1:9", "--token", "x")
    assert r.returncode == 2
    assert "cannot reach the coordinator" in r.stderr and "Traceback" not in r.stderr


def test_missing_spec_and_bad_yaml_are_one_line(tmp_path):
    r = run("job", "submit", str(tmp_path / "nope.yaml"), "--token", "x")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    r = run("job", "submit", str(bad), "--token", "x")
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_unknown_scenario_is_one_line():
    r = run("demo", "--scenario", "retail", "--headless")
    assert r.returncode == 2 and "unknown scenario" in r.stderr and "Traceback" not in r.stderr
