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


def test_each_method_is_counted_on_its_own_graphs(capsys):
    rows = load_script("eager_operators").main(["--methods", "oft,sparsevlm"])
    assert [r["policy"] for r in rows] == ["oft"] + ["sparsevlm"] * 3
    oft = rows[0]
    assert oft["graphs"] == 2 and oft["eager_operators"] > 0  # vision with projector, and all 32 layers
    # SparseVLM's stages run eagerly around their reads: more operators and graphs than OFT
    assert all(r["eager_operators"] > oft["eager_operators"] and r["graphs"] > 2 for r in rows[1:])
    assert "oft" in capsys.readouterr().out
