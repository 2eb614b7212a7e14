"""Graph datasets for node classification: ``karate`` (networkx) and ``cora`` (files from a user path).

One graph does not fit the image/batch layout, so a graph dataset is laid out as follows: an example
is a node id (float32 ``(N, 1)``), the train/test splits are the node masks, and the graph itself (node
features and edges, :class:`gradkit.models.gcn.Graph`) goes to the model through
``Dataset.model_args["graph"]``. A batch is a set of training nodes of the whole graph; with a batch
size >= the number of training nodes every step is full-batch, as GCN training usually is.

* ``karate``: Zachary's karate club (34 nodes, 78 edges, 2 factions), shipped with networkx
  (``pip install gradkit[graph]``). Features are one-hot node ids; the split is a fixed stratified half.
* ``cora``: the LINQS ``cora.content`` (``paper_id word... label``) and ``cora.cites`` (``cited citing``)
  files, from a folder ``cora/`` under ``--data-dir`` (or the data roots). Features are the binary word
  vectors, row-normalised; the split follows Planetoid's convention: 20 training nodes per class and
  1,000 test nodes, drawn with seed 0. Planetoid's own pickled ``ind.cora.*`` files are not read: they
  hold scipy objects that gradkit's restricted unpickler rightly refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gradkit.data._locate import search_roots
from gradkit.data._registry import DATASETS
from gradkit.data._types import Dataset, DatasetInfo
from gradkit.errors import DataError
from gradkit.models.gcn import Graph

__all__ = ["load_karate", "load_cora", "graph_dataset"]


def graph_dataset(
    name: str,
    graph: Graph,
    labels: torch.Tensor,
    train: np.ndarray,
    test: np.ndarray,
    classes: tuple[str, ...],
    source: str,
) -> Dataset:
    """A node-classification :class:`Dataset` whose examples are the node ids of ``train``/``test``."""
    ids = torch.arange(graph.num_nodes, dtype=torch.float32).unsqueeze(1)
    tr, te = torch.from_numpy(train).long(), torch.from_numpy(test).long()
    info = DatasetInfo(name, (1,), len(classes), classes, (0.0,), (1.0,), False, source)
    return Dataset(info, ids[tr], labels[tr], ids[te], labels[te], model_args={"graph": graph})


def _stratified(labels: np.ndarray, per_class: int | float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = per_class if isinstance(per_class, int) else int(round(per_class * len(members)))
        picked.append(np.sort(members[:k]))
    return np.sort(np.concatenate(picked))


@DATASETS.register("karate", help="Zachary's karate club graph (networkx), 34 nodes, 2 classes; for gcn")
def load_karate(data_dir: str | os.PathLike[str] | None = None, *, download: bool = False) -> Dataset:
    """The karate-club graph from networkx; ``data_dir`` and ``download`` are ignored."""
    try:
        import networkx as nx
    except ImportError:
        raise DataError("the karate dataset comes with networkx, which is not installed: pip install 'gradkit[graph]'") from None
    g = nx.karate_club_graph()
    nodes = sorted(g.nodes)
    factions = sorted({g.nodes[n]["club"] for n in nodes})
    labels = np.array([factions.index(g.nodes[n]["club"]) for n in nodes])
    edges = torch.tensor(sorted((min(a, b), max(a, b)) for a, b in g.edges), dtype=torch.int64).t()
    graph = Graph(torch.eye(len(nodes)), edges)
    train = _stratified(labels, 0.5, seed=0)
    test = np.setdiff1d(np.arange(len(nodes)), train)
    return graph_dataset("karate", graph, torch.from_numpy(labels).long(), train, test, tuple(factions), "networkx")


def _find_cora(data_dir: str | os.PathLike[str] | None) -> Path | None:
    for root in search_roots(data_dir):
        for folder in (root, root / "cora"):
            if (folder / "cora.content").is_file() and (folder / "cora.cites").is_file():
                return folder
    return None


@DATASETS.register("cora", help="Cora citation graph from cora.content/cora.cites under --data-dir; for gcn")
def load_cora(data_dir: str | os.PathLike[str] | None = None, *, download: bool = False) -> Dataset:
    """Cora from the LINQS text files (see the module docstring); ``download`` is not supported."""
    folder = _find_cora(data_dir)
    if folder is None:
        roots = ", ".join(str(r) for r in search_roots(data_dir))
        raise DataError(
            f"dataset 'cora' not found; searched {roots} (a cora/ folder with cora.content and cora.cites); "
            "point --data-dir at it"
        )
    ids, feats, names = [], [], []
    with (folder / "cora.content").open() as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3:
                raise DataError(f"{folder / 'cora.content'}:{lineno}: expected 'paper_id features... label'")
            ids.append(parts[0])
            try:
                feats.append([float(v) for v in parts[1:-1]])
            except ValueError:
                raise DataError(f"{folder / 'cora.content'}:{lineno}: features must be numbers") from None
            names.append(parts[-1])
    if len({len(r) for r in feats}) != 1:
        raise DataError(f"{folder / 'cora.content'}: rows have different numbers of features")
    index = {p: i for i, p in enumerate(ids)}
    classes = tuple(sorted(set(names)))
    labels = np.array([classes.index(n) for n in names])
    edges = []
    with (folder / "cora.cites").open() as f:
        for line in f:
            parts = line.split()
            # Citations of papers outside cora.content are dropped (a few exist in the LINQS release).
            if len(parts) == 2 and parts[0] in index and parts[1] in index:
                edges.append((index[parts[0]], index[parts[1]]))
    x = torch.tensor(feats)
    x = x / x.sum(1, keepdim=True).clamp_min(1.0)
    edge_t = torch.tensor(edges, dtype=torch.int64).t() if edges else torch.zeros(2, 0, dtype=torch.int64)
    train = _stratified(labels, 20, seed=0)
    rest = np.setdiff1d(np.arange(len(ids)), train)
    test = np.sort(np.random.default_rng(0).permutation(rest)[:1000])
    return graph_dataset("cora", Graph(x, edge_t), torch.from_numpy(labels).long(), train, test, classes, str(folder))
