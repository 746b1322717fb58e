"""Fixtures shared by several test modules, and the reliability tally printed at the end of a run."""
import pytest

#: case -> outcome of tests/test_reliability.py ("clear error", "works", "crash", "silent", "data lost", "unclear")
RELIABILITY_TALLY: dict = {}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread avoids OpenMP spin-waiting on a loaded 2-core machine (10x slower)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs) for the whole test run: starting one costs about 10 s. Code under test that calls
    ``ebm_sim.cluster.connect`` (``--cluster local``) reuses it. Skipped without Ray (``pip install -e .[cluster]``)."""
    pytest.importorskip("ray")
    from ebm_sim import cluster
    ray = cluster.connect("local", num_cpus=2, log=lambda msg: None)
    yield ray
    cluster.shutdown()


@pytest.fixture(scope="session")
def reliability_tally() -> dict:
    return RELIABILITY_TALLY


def pytest_terminal_summary(terminalreporter):
    """The reliability module's own counts: cases tried, and how each ended."""
    if not RELIABILITY_TALLY:
        return
    outcomes = list(RELIABILITY_TALLY.values())
    counts = {name: outcomes.count(name) for name in
              ("clear error", "works", "crash", "silent", "data lost", "unclear")}
    terminalreporter.write_sep("-", "reliability cases (tests/test_reliability.py)")
    terminalreporter.write_line(f"{len(outcomes)} cases tried: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for case, outcome in sorted(RELIABILITY_TALLY.items()):
        if outcome not in ("clear error", "works"):
            terminalreporter.write_line(f"  {outcome}: {case}")
