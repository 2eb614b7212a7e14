"""``gcn``: a two-layer graph convolutional network (Kipf & Welling, ICLR 2017) for node classification.

A graph dataset's examples are node ids (``(N, 1)`` float32) and its one graph travels to the model as
``build_model(..., graph=Graph)`` (``Dataset.model_args``): a batch is a set of (training) nodes of that
one graph, i.e. the whole graph with a mask, and a batch size at least the number of training nodes
makes each step full-batch.

``out = Â relu(Â X W1 + b1) W2 + b2`` with ``Â = D^-1/2 (A + I) D^-1/2``. Block ``gc1`` holds the graph
and the first graph convolution :class:`GraphConv`, a Linear map of the aggregated input ``ÂX`` (constant,
precomputed), whose output (every node) is shared by the whole batch; it then aggregates the hidden
states for the batch's nodes, so block ``head`` is a Linear on ``(ÂH)`` rows. For the likelihood-ratio
method (Jiang et al., ICLR 2024) both layers therefore use the Linear estimator with the aggregated
input in place of x; the shared layer weights each noisy copy by its batch-mean loss.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.models._layers import positive_ints
from gradkit.models._registry import MODELS

__all__ = ["Graph", "GraphConv", "GraphInput", "gcn", "normalized_adjacency"]


@dataclass(frozen=True)
class Graph:
    """One graph: node features ``(nodes, F)`` and undirected edges ``(2, E)`` (node indices)."""

    features: torch.Tensor
    edges: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])


def normalized_adjacency(num_nodes: int, edges: torch.Tensor) -> torch.Tensor:
    """Dense ``D^-1/2 (A + I) D^-1/2`` of the symmetrised graph."""
    a = torch.zeros(num_nodes, num_nodes)
    if edges.numel():
        a[edges[0], edges[1]] = 1.0
        a[edges[1], edges[0]] = 1.0
    a.fill_diagonal_(1.0)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


class GraphConv(nn.Linear):
    """Graph convolution ``(ÂX) W + b`` given the aggregated input ``ÂX``.

    Its output covers every node and is shared by the batch (``output_shared_by_batch``); a
    likelihood-ratio estimate uses the Linear contraction with ``ÂX`` in place of x
    (``estimate_as_linear``).
    """

    output_shared_by_batch = True
    estimate_as_linear = True


class GraphInput(nn.Module):
    """Block ``gc1``: graph convolution over all nodes, ReLU, then ``Â``-aggregation for the batch's nodes.

    Under likelihood-ratio noise the convolution's output arrives as ``(copies, nodes, H)``, one noisy
    hidden state per copy; rows ``c*B + n`` of the (copy-stacked) batch read copy ``c``.
    """

    adj: torch.Tensor
    ax: torch.Tensor

    def __init__(self, graph: Graph, hidden: int) -> None:
        super().__init__()
        adj = normalized_adjacency(graph.num_nodes, graph.edges)
        # Constant graph data, rebuilt from the dataset: kept out of checkpoints.
        self.register_buffer("adj", adj, persistent=False)
        self.register_buffer("ax", adj @ graph.features.float(), persistent=False)
        self.conv = GraphConv(graph.features.shape[1], hidden)
        self.relu = nn.ReLU()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.reshape(-1).round().long()
        h = self.relu(self.conv(self.ax))
        rows = self.adj[idx]  # (M, nodes)
        if h.dim() == 3:
            copies = h.shape[0]
            return torch.bmm(rows.view(copies, -1, rows.shape[1]), h).reshape(idx.shape[0], -1)
        return rows @ h


@MODELS.register("gcn", help="two-layer graph convolutional network (needs a graph dataset: karate, cora)")
def gcn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    graph: Graph | None = None,
    hidden: int = 16,
) -> nn.Sequential:
    """GCN of Kipf & Welling (2017): blocks ``gc1`` (:class:`GraphInput`) and ``head`` (Linear).

    Args:
        input_shape: ``(1,)``: an example is a node id.
        num_classes: node classes.
        graph: the dataset's graph (from ``Dataset.model_args``).
        hidden: width of the hidden graph convolution.
    """
    if graph is None:
        raise ConfigError("model 'gcn' classifies the nodes of a graph: use --data karate or --data cora")
    (hidden,) = positive_ints("gcn", "hidden", hidden)
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["gc1"] = GraphInput(graph, hidden)
    blocks["head"] = nn.Sequential(OrderedDict(fc=nn.Linear(hidden, num_classes)))
    return nn.Sequential(blocks)
