"""scripts/eager_operators.py: operators a query launches outside graphs, per method."""

import pytest

from tests.scripts import load_script

torch = pytest.importorskip("torch")


def test_operators_inside_a_graph_recording_are_not_counted():
    from policies.vla.graphs import recording

    script = load_script("eager_operators")
    x = torch.ones(3)
    with script.EagerOperators() as counter:
        with recording():
            x + x
        x * x
    assert counter.count == 1


def test_operators_count_as_launched_while_the_gpu_waits_from_a_host_read_to_the_next_graph():
    from policies.vla.graphs import recording

    script = load_script("eager_operators")
    x = torch.ones(3)
    counter = script.EagerOperators()
    with script.ReadsOf(counter), counter:
        x + x  # the query's start: nothing queued
        with recording():
            x * x
        x - x  # issued while the graph runs
        (x + 1).tolist()  # read: the GPU is idle again
        x * 2
        x / 2
        with recording():
            x + x
    assert (counter.count, counter.while_waiting, counter.reads) == (5, 3, 1)


def test_each_method_is_counted_on_its_own_graphs(capsys):
    rows = load_script("eager_operators").main(["--methods", "oft,sparsevlm"])
    assert [r["policy"] for r in rows] == ["oft"] + ["sparsevlm"] * 3
    oft = rows[0]
    assert oft["graphs"] == 2 and oft["eager_operators"] > 0  # vision with projector, and all 32 layers
    # SparseVLM's stages run eagerly around their reads: more operators and graphs than OFT
    assert all(r["eager_operators"] > oft["eager_operators"] and r["graphs"] > 2 for r in rows[1:])
    # OFT reads nothing on the host before its action; each SparseVLM stage reads its target,
    # and the launches after a read find the GPU idle
    assert oft["host_reads"] == 0 and all(r["host_reads"] == 4 for r in rows[1:])
    assert all(r["while_waiting"] > oft["while_waiting"] for r in rows[1:])
    assert "oft" in capsys.readouterr().out
