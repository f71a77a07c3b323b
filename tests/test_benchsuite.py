"""The bench suite (``fastft bench`` / ``python -m fastft.benchsuite``), bench/bench_e2e.py and bench/plot.py.

Format only: a quick run prints the combined table and writes its JSON; no timing is judged.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastft import benchsuite

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
E2E_ROW_KEYS = {"mode", "provider", "status", "median_ms", "tokens_per_s", "tps_p20", "tps_p80", "speedup",
                "step_peak_mib", "mem_ratio", "total_peak_mib", "loss_first", "loss_last", "agree"}  # fmt: skip


def _env(tmp_path):
    env = os.environ.copy()
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MPLCONFIGDIR"] = str(tmp_path / "mpl")
    return env


def _args(**kw):
    p = argparse.ArgumentParser()
    benchsuite.add_arguments(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def quick_e2e(tmp_path_factory):
    """One quick suite run of the end-to-end bench (the heaviest part of this file): output and folder."""
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run(
        [sys.executable, "-m", "fastft.benchsuite", "--quick", "--ops", "e2e", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return proc, out


def test_quick_suite_prints_the_table_and_writes_json(quick_e2e):
    proc, out = quick_e2e
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "| bench" in text and "| case" in text and "speedup" in text and "memory x ref" in text
    assert "fastft bench --quick: cpu" in text  # the device and the date head the table
    table = [ln for ln in text.splitlines() if ln.startswith("| e2e")]
    assert {"fastft", "fastft+ckpt"} <= {ln.split("|")[3].strip() for ln in table}
    (suite,) = glob.glob(str(out / "suite-quick-cpu-*.json"))
    doc = json.loads(Path(suite).read_text())
    assert doc["benches"] == ["e2e"] and doc["quick"] is True
    assert {"versions", "git_sha", "device_name", "timestamp_utc"} <= set(doc["env"])
    assert doc["runs"][0]["status"] == "ok"
    rows = [r for r in doc["rows"] if r["bench"] == "e2e"]
    assert rows and all({"fastft_ms", "ref_ms", "speedup", "mem_ratio", "ok"} <= set(r) for r in rows)
    assert all(r["ok"] is True for r in rows)  # fp32: the losses of fastft and PEFT agree


def test_quick_e2e_json_has_the_expected_keys(quick_e2e):
    _, out = quick_e2e
    (path,) = glob.glob(str(out / "e2e-quick-cpu-*.json"))
    doc = json.loads(Path(path).read_text())
    assert doc["name"] == "e2e-quick" and doc["bench"] == "e2e"
    assert {"env", "config", "results", "targets", "elapsed_s"} <= set(doc)
    cfg = doc["config"]
    assert cfg["quick"] is True and cfg["modes"] == ["lora", "moe"] and cfg["providers"][0] == "peft"
    by = {(r["mode"], r["provider"]): r for r in doc["results"]}
    assert set(by) == {(m, p) for m in ("lora", "moe") for p in ("peft", "fastft", "fastft+ckpt")}
    for r in by.values():
        assert r["status"] == "ok", r
        assert E2E_ROW_KEYS <= set(r), E2E_ROW_KEYS - set(r)
        assert len(r["losses"]) == cfg["warmup"] + cfg["steps"]
    assert by[("lora", "peft")]["speedup"] == pytest.approx(1.0)
    assert "lora" in by[("lora", "fastft")]["patched"] and "loss" in by[("lora", "fastft")]["patched"]
    assert "experts" in by[("moe", "fastft")]["patched"]  # the MoE row (issue 16): fastft's experts op
    assert all({"target", "value", "limit", "met"} <= set(t) for t in doc["targets"])


def test_plot_renders_png(quick_e2e, tmp_path):
    pytest.importorskip("matplotlib")
    _, out = quick_e2e
    files = glob.glob(str(out / "e2e-quick-cpu-*.json")) + [str(BENCH / "results" / "lora-cpu-amd-epyc.json")]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "plot.py"), *files, "--out", str(tmp_path / "plots")],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted(tmp_path.joinpath("plots").glob("*.png"))
    assert len(pngs) == 2
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)


def test_rows_from_the_committed_per_op_results():
    """The suite's reader understands the JSON of every per-op bench (the files in bench/results/)."""
    seen = set()
    for path in sorted((BENCH / "results").glob("*-cpu-*.json")):
        doc = json.loads(path.read_text())
        rows = benchsuite.rows_from_result(doc)
        name = doc.get("bench") or doc.get("name")
        if name in benchsuite.PER_OP:
            assert rows, path.name
            seen.add(name)
            for r in rows:
                assert r["fastft_ms"] > 0 and r["ref_ms"] > 0 and r["speedup"] > 0, r
    assert seen == set(benchsuite.PER_OP)
    text = benchsuite.render(benchsuite.rows_from_result(json.loads((BENCH / "results" / "lora-cpu-amd-epyc.json").read_text())),
                             {"device": "cpu", "versions": {}}, quick=False)  # fmt: skip
    assert text.splitlines()[2].startswith("| bench")


def test_unknown_op_is_a_value_error_listing_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown bench 'nope'.*cross_entropy, lora, nf4, checkpointing, fused_ops, moe, e2e"
    ):
        benchsuite.run(_args(ops="lora,nope"))
    with pytest.raises(ValueError, match="--ops is empty"):
        benchsuite.run(_args(ops=","))
    assert benchsuite.parse_benches(None, True) == [*benchsuite.PER_OP, "e2e"]
    assert benchsuite.parse_benches("e2e,lora", True) == ["e2e", "lora"]


def test_standalone_exit_code_2_on_bad_op(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastft.benchsuite", "--ops", "bogus"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown bench 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_installed_without_bench_dir_is_a_clear_error(monkeypatch, tmp_path):
    import fastft

    fake = tmp_path / "site" / "fastft"
    fake.mkdir(parents=True)
    monkeypatch.setattr(fastft, "__file__", str(fake / "__init__.py"))
    with pytest.raises(ValueError, match="runs from a source checkout: bench/ not found next to the fastft package"):
        benchsuite.run(_args(quick=True, ops="lora"))


def test_rows_from_the_committed_dpo_result():
    """bench_dpo.py's JSON (fastft vs TRL's DPO loss on logits) becomes one suite row, losses agreeing."""
    paths = sorted((BENCH / "results").glob("dpo-cpu-*.json"))
    assert paths
    rows = benchsuite.rows_from_result(json.loads(paths[0].read_text()))
    assert 1 <= len(rows) <= 2 and all(r["bench"] == "dpo" and r["ok"] is True for r in rows)
    assert rows[0]["fastft_ms"] > 0 and rows[0]["ref_ms"] > 0 and 0 < rows[0]["mem_ratio"] < 1
    assert "dpo" in benchsuite.BENCHES and "dpo" not in benchsuite.parse_benches(None, True)
