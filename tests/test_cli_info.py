"""`fastft info` and the CLI's error contract (exit 2, one line, no traceback)."""

import json
import os
import subprocess
import sys

import pytest

from fastft import _ext, backends
from fastft.cli import main


def _run(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastft", *args], capture_output=True, text=True, env=full_env)


def test_info_names_a_backend_and_a_reason_for_every_op(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for op in backends.registered_ops():
        assert f"| {op} | cpu | " in text
    assert "torch" in text and "transformers" in text


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"]["fused_linear_cross_entropy"]["cpu"]["backend"] == "torch"
    assert "why" in info["ops"]["cross_entropy"]["cpu"]
    assert info["versions"]["torch"] != "not installed"


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["bogus"], {}, "invalid choice"),
        ([], {}, "a command is required"),
        (["info"], {"FASTFT_BACKEND": "tpu"}, "FASTFT_BACKEND must be one of"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, env, needle):
    res = _run(*args, env=env)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_forced_backend_shows_in_info():
    res = _run("info", env={"FASTFT_BACKEND": "torch"})
    assert res.returncode == 0
    assert "FASTFT_BACKEND=torch" in res.stdout


def test_missing_extension_is_reported_not_raised():
    ok, why = _ext.available("cpp", "cross_entropy")
    assert not ok and "cross_entropy" in why
    ok, why = _ext.available("rocm", "cross_entropy")
    assert not ok and "rocm" in why
    assert set(_ext.status()) == {"cpp", "cuda"}
