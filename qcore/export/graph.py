"""Editing an ONNX graph in place: fresh names, constants, and nodes spliced in before a node.

``GraphEditor(proto)`` keeps the node list while rewrites are collected; ``finish()`` writes it back
in a valid (topological) order: nodes that read only constants first (decoded weights), then each
original node preceded by the nodes inserted in front of it (an input's quantize/dequantize pair).
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from qcore.model.onnx_graph import fresh_name


class GraphEditor:
    def __init__(self, proto):
        self.proto, self.graph = proto, proto.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.nodes = list(self.graph.node)
        self._names = set(self.inits) | {o for n in self.nodes for o in n.output} | \
            {i.name for i in self.graph.input} | {n.name for n in self.nodes}
        self._front: list = []  # nodes that depend on constants only
        self._before: dict[int, list] = {}  # id(node) -> nodes to run just before it

    # ---- names and constants -------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return fresh_name(hint, self._names)

    def const(self, value, hint: str) -> str:
        """A new initializer holding ``value`` (numpy array or scalar, dtype kept), its name."""
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def drop_initializer(self, name: str) -> None:
        """Remove an initializer (its name becomes free for a node output of the same name)."""
        init = self.inits.pop(name)
        self.graph.initializer.remove(init)
        for i in [i for i in self.graph.input if i.name == name]:
            self.graph.input.remove(i)

    # ---- nodes -----------------------------------------------------------------------------------
    def consumers(self, name: str) -> list:
        return [n for n in self.nodes if name in n.input]

    def producer(self, name: str):
        return next((n for n in self.nodes if name in n.output), None)

    def node(self, op: str, inputs: list[str], hint: str, before=None, output: str | None = None,
             n_outputs: int = 1, **attrs) -> str:
        """Add ``op(inputs)``; returns its first output's name. ``before``: the node it must precede
        (None: it reads constants only and goes first). ``output``: a fixed output name."""
        out = output or self.fresh(hint)
        outs = [out] + [self.fresh(hint) for _ in range(n_outputs - 1)]
        n = helper.make_node(op, inputs, outs, name=self.fresh(f"{hint}/{op}"), **attrs)
        (self._front if before is None else self._before.setdefault(id(before), [])).append(n)
        return out

    def replace(self, old, new) -> None:
        """Put node ``new`` where ``old`` was."""
        self.nodes[self.nodes.index(old)] = new
        if id(old) in self._before:
            self._before[id(new)] = self._before.pop(id(old))

    def finish(self) -> None:
        ordered = list(self._front)
        for n in self.nodes:
            ordered += self._before.get(id(n), []) + [n]
        del self.graph.node[:]
        self.graph.node.extend(ordered)

    def prune(self) -> None:
        """Drop the nodes no graph output depends on, then the initializers nothing reads (call it
        before inserting nodes: it walks the node list only)."""
        needed = {o.name for o in self.graph.output}
        kept = []
        for n in reversed(self.nodes):
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(i for i in n.input if i)
                # values an If/Loop body reads from this graph
                needed.update(i for g in _subgraphs(n) for node in _all_nodes(g) for i in node.input if i)
        self.nodes = kept[::-1]
        for name in [name for name in self.inits if name not in needed]:
            self.drop_initializer(name)

    def rename_value(self, old: str, new: str) -> None:
        """Rename a value (graph input/output, node output or initializer) everywhere it is used."""
        if old in self.inits:
            self.inits[new] = self.inits.pop(old)
            self.inits[new].name = new
        for n in self.nodes:
            n.input[:] = [new if i == old else i for i in n.input]
            n.output[:] = [new if o == old else o for o in n.output]
            for node in (node for g in _subgraphs(n) for node in _all_nodes(g)):  # If/Loop bodies read outer values
                node.input[:] = [new if i == old else i for i in node.input]
        for v in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            if v.name == old:
                v.name = new
        self._names.add(new)


def _subgraphs(node) -> list:
    """The graphs a node holds (an If's branches, a Loop's body)."""
    from onnx import AttributeProto

    return [a.g for a in node.attribute if a.type == AttributeProto.GRAPH] + \
        [g for a in node.attribute if a.type == AttributeProto.GRAPHS for g in a.graphs]


def _all_nodes(graph):
    """Every node of ``graph``, those in its nodes' subgraphs included (depth first)."""
    for node in graph.node:
        yield node
        for g in _subgraphs(node):
            yield from _all_nodes(g)
