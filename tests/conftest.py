"""Shared test setup.

``TRITON_INTERPRET=1`` must be in the environment before triton is imported (triton
reads it when a kernel is defined), so it is set here, at the very top: Triton kernels
then run on CPU tensors in the interpreter whenever ``backend="triton"`` is forced.

On a GPU machine, ``FASTFT_GPU_TESTS=1 python -m pytest tests/test_gpu.py`` leaves the
interpreter off so the same kernels compile and run on the device (tests/test_gpu.py).
"""

import os

if os.environ.get("FASTFT_GPU_TESTS", "0") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (the README's ``-n auto``) each worker gets its share of the cores as torch
# threads: two workers of two OpenMP threads each on two cores would spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny matrices (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    one thread is fastest there, and on a shared 2-core machine it avoids OpenMP contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Files whose tests force Triton on CPU tensors (they need the interpreter). On a GPU run
# (FASTFT_GPU_TESTS=1, interpreter off) those tests skip; their GPU counterparts are the tests
# marked ``gpu`` (tests/test_gpu.py and the gpu-marked tests in these files), and the
# ahead-of-time compile tests run either way.
_INTERPRETER_FILES = {
    "test_lora_triton.py",
    "test_nf4_triton.py",
    "test_cross_entropy_triton.py",
    "test_experts_nf4_triton.py",
}


def _zoo_requested(config) -> bool:
    """The full zoo sweep runs only when asked for: ``-m zoo`` (any -m expression naming it) or FASTFT_ZOO=1."""
    return os.environ.get("FASTFT_ZOO", "0") == "1" or "zoo" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
    # The model-zoo sweep's family tests carry the ``zoo`` marker; all but its fast subset
    # (``zoo(fast=True)``) are deselected (not run, and counted as deselected in the summary) unless the
    # sweep is requested or a test is named on the command line. Nothing else is deselected, unlike
    # addopts = -m "not zoo", and -m zoo selects the whole sweep, fast subset included.
    if not _zoo_requested(config):
        named = {a for a in config.args if "::" in a}

        def full_sweep_only(it):
            mark = it.get_closest_marker("zoo")
            return mark is not None and not mark.kwargs.get("fast", False) and it.nodeid not in named

        drop = [it for it in items if full_sweep_only(it)]
        if drop:
            dropped = set(map(id, drop))
            items[:] = [it for it in items if id(it) not in dropped]
            config.hook.pytest_deselected(items=drop)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    skip = pytest.mark.skip(reason="forces Triton on CPU tensors: needs TRITON_INTERPRET=1 (a CPU run)")
    for item in items:
        if item.path.name in _INTERPRETER_FILES and "gpu" not in item.keywords and "compile" not in item.name:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------
# fixtures of the cross-entropy tests (test_cross_entropy*.py; their helpers are in _ce.py)
# --------------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny chunk budget: chunk_rows hits its minimum of 16 rows."""
    monkeypatch.setenv("FASTFT_CE_CHUNK_MB", "0.01")


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Interpreted Triton tiles of 64 along V: the ops' multi-tile paths with small vocabularies."""
    from fastft.kernels import cross_entropy as kmod

    monkeypatch.setattr(kmod, "_MAX_BLOCK_V_INTERPRET", 64)


@pytest.fixture
def count_triton(monkeypatch):
    """Count the calls to the Triton row kernel (imported lazily by the ops)."""
    from fastft.kernels import cross_entropy as kmod

    calls = []
    real = kmod.ce_rows_triton

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kmod, "ce_rows_triton", counting)
    return calls
