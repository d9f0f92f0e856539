"""Graphs: the YAML model graphs users edit, and the code that loads, checks, resolves and
builds them. May import `blocks`; never `search` or `app`.

    g = graphs.load("graphs/gpt2.yaml", size="tiny")   # GraphError on a bad file
    g.space()                                          # search-space dimensions
    plan = graphs.elaborate(g.resolve({"training.lr": 3e-4}))
    model = graphs.build(plan)                         # nn.Module; compile separately
"""
from graphs.build import GraphModel, build  # noqa: F401
from graphs.elaborate import elaborate  # noqa: F401
from graphs.plan import Plan  # noqa: F401
from graphs.errors import GraphError  # noqa: F401
from graphs.graph import Graph, load, loads  # noqa: F401
