"""Dividing the original rows into subsets: the static split and the partition tree.

The patent's static division (:func:`stratified_split`) deals whole original rows (never expanded
rows) out at random, stratified by class. The :class:`PartitionTree` divides by what the data
look like instead: each internal node splits its region of feature space by a hyperplane
(``x @ a <= b`` goes left), either a cluster boundary or a threshold on one feature, and its
leaves are the subsets fitted. A region may also be dealt out at random into pieces (a
``"random"`` node): that is how the tree holds the static division (``granularity=0``) and how
it gives every worker a subset when there are fewer regions than workers. Pieces of one region
share its model. A ``"groups"`` node sends each row to the child of its group (federated
sites: ``fit(X, y, groups=...)``), by a label given beside the features, not by them; a row
of a group the node does not know, or given without its group, reaches no leaf (position -1).

The tree is grown by :func:`fedgrain.partition.growth.grow`; this module holds the structure:
routing, split and merge of single leaves, sizes, and saving as plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.standardize import Standardizer

#: Rows dealt out at a time by :func:`stratified_split`.
_SPLIT_CHUNK = 1 << 20


def stratified_split(codes: np.ndarray, n_subsets: int, rng: np.random.Generator) -> np.ndarray:
    """Assign rows to ``n_subsets`` random, class-stratified subsets.

    The rows of each class are shuffled and dealt out in turn, continuing the rotation from one
    class to the next, so each class is spread as evenly as possible and subset sizes differ by
    at most one.

    Parameters
    ----------
    codes : ndarray of shape (n,)
        Class codes.
    n_subsets : int
    rng : numpy Generator

    Returns
    -------
    ndarray of shape (n,)
        The subset of each row (a compact integer type: 2 bytes a row for up to 32,767 subsets).
        ``np.flatnonzero(labels == m)`` lists subset ``m``'s rows in their original order.
    """
    dtype = np.int16 if n_subsets <= np.iinfo(np.int16).max else np.int32
    labels = np.empty(codes.shape[0], dtype=dtype)
    offset = int(rng.integers(n_subsets))
    index = np.int32 if codes.shape[0] < np.iinfo(np.int32).max else np.int64
    for c in np.flatnonzero(np.bincount(codes)):  # the classes present, in order
        rows = np.flatnonzero(codes == c).astype(index, copy=False)
        perm = rng.permutation(rows.shape[0])
        # the i-th row of the permutation gets subset (i + offset) mod M; in chunks, so no
        # array of the class's size is made beyond ``rows`` and ``perm`` (data read from disk
        # keep only a few bytes a row in memory)
        for a in range(0, rows.shape[0], _SPLIT_CHUNK):
            b = min(a + _SPLIT_CHUNK, rows.shape[0])
            labels[rows[perm[a:b]]] = (np.arange(a, b) + offset) % n_subsets
        offset = (offset + rows.shape[0]) % n_subsets
    return labels


class TreeDescription(list):
    """The lines of :meth:`PartitionTree.describe`: a list that prints as the tree."""

    def __str__(self) -> str:
        return "\n".join(self)

    __repr__ = __str__


@dataclass
class Node:
    """One node of the tree.

    ``kind`` is ``"leaf"``, ``"hyperplane"`` (children ``(left, right)``: ``x @ a <= b`` goes
    left, in the original feature units), ``"random"`` (children are random pieces of the
    node's rows) or ``"groups"`` (one child per group label, ``evidence["groups"]`` in the
    children's order). ``key`` is the node's position in a complete binary numbering (root 1,
    children ``2 key`` and ``2 key + 1``; the pieces of a random node and the groups of a groups
    node ``key * 1000 + i``), the same however
    the tree was grown, so it seeds the node's random choices. ``evidence`` records why a node was
    split (the candidate, its ``Q``, degrees of freedom, p-value and expected gain).
    """

    id: int
    parent: int
    depth: int
    key: int
    kind: str = "leaf"
    children: tuple[int, ...] = ()
    a: np.ndarray | None = None
    b: float = 0.0
    n_rows: int = 0
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "parent": self.parent, "depth": self.depth, "key": self.key,
                "kind": self.kind, "children": list(self.children),
                "a": None if self.a is None else self.a.tolist(), "b": self.b,
                "n_rows": self.n_rows, "evidence": self.evidence}

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        return cls(int(d["id"]), int(d["parent"]), int(d["depth"]), int(d["key"]),
                   str(d["kind"]), tuple(int(c) for c in d["children"]),
                   None if d["a"] is None else np.asarray(d["a"], dtype=float), float(d["b"]),
                   int(d["n_rows"]), dict(d["evidence"]))


#: Up to this many hyperplanes, rows are routed through a table of all side codes.
TABLE_PLANES = 12
#: Rows routed at a time.
ROUTE_BLOCK = 16_384


class PartitionTree:
    """A partition of feature space into leaves; routes any row to exactly one leaf.

    Parameters
    ----------
    n_features : int
        Encoded features (the columns ``route`` expects).
    n_classes : int
    standardizer : Standardizer
        The global standardisation the tree was grown in (for profiles of new data).
    seed : int
        Seeds the routing of new rows among random pieces.

    Attributes
    ----------
    leaves : list of int
        Leaf node ids in depth-first order; ``route`` returns positions in this list, which are
        also the positions of the fitted leaf models.
    sizes : ndarray of int
        Training rows per leaf.
    growth : dict or None
        How :func:`fedgrain.partition.growth.grow` grew the tree (``granularity``,
        ``min_size``); None for a tree made by hand.
    stability_ : fedgrain.partition.tree.Stability or None
        The last :meth:`stability` measured (None until then, and again once the tree is
        split or merged).

    Examples
    --------
    >>> import numpy as np
    >>> from fedgrain.partition.tree import PartitionTree
    >>> from fedgrain.federation.shards import Standardizer
    >>> X = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> tree = PartitionTree(1, 2, Standardizer.fit(X))
    >>> left, right = tree.split(tree.root, np.array([1.0]), 1.5)
    >>> tree.route(X).tolist()
    [0, 0, 1, 1]
    """

    def __init__(self, n_features: int, n_classes: int, standardizer: Standardizer,
                 seed: int = 0):
        self.n_features = n_features
        self.n_classes = n_classes
        self.standardizer = standardizer
        self.seed = seed
        self.nodes: dict[int, Node] = {0: Node(0, -1, 0, 1)}
        self._next = 1
        self._shape = 0  # counts splits and merges (see ``leaves``)
        self.growth: dict | None = None
        self.stability_ = None

    # ---- structure --------------------------------------------------------------------------
    @property
    def root(self) -> int:
        return 0

    @property
    def leaves(self) -> list[int]:
        # Kept from the last walk while the structure is the same (the nodes dict, its size,
        # the ids handed out and the splits and merges made): callers ask for it once per
        # leaf, and a walk of a thousand sites' tree costs half a millisecond.
        key = (id(self.nodes), len(self.nodes), self._next, self._shape)
        if getattr(self, "_leaves", (None,))[0] != key:
            out, stack = [], [0]
            while stack:
                node = self.nodes[stack.pop()]
                if node.kind == "leaf":
                    out.append(node.id)
                else:
                    stack.extend(reversed(node.children))
            self._leaves = (key, out)
        return list(self._leaves[1])

    @property
    def n_leaves(self) -> int:
        return len(self.leaves)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([self.nodes[i].n_rows for i in self.leaves], dtype=np.int64)

    def region_of(self) -> np.ndarray:
        """For each leaf, the node whose model it shares: its random parent, or itself."""
        out = []
        for i in self.leaves:
            parent = self.nodes[i].parent
            out.append(parent if parent >= 0 and self.nodes[parent].kind == "random" else i)
        return np.array(out, dtype=np.int64)

    def siblings(self) -> np.ndarray:
        """For each leaf, its parent id (leaves with the same value are siblings)."""
        return np.array([self.nodes[i].parent for i in self.leaves], dtype=np.int64)

    def _add(self, parent: Node, key: int) -> int:
        nid = self._next
        self._next += 1
        self.nodes[nid] = Node(nid, parent.id, parent.depth + 1, key)
        return nid

    def split(self, leaf_id: int, a: np.ndarray, b: float,
              evidence: dict | None = None) -> tuple[int, int]:
        """Split a leaf by the hyperplane ``x @ a <= b`` (left) in original feature units.

        Returns the ids of the two new leaves; their sizes are zero until :meth:`count` runs.
        """
        node = self._leaf(leaf_id)
        self.stability_ = None
        a = np.asarray(a, dtype=float).reshape(-1)
        if a.shape[0] != self.n_features or not np.all(np.isfinite(a)) or not np.isfinite(b):
            raise ValueError(f"A split needs {self.n_features} finite coefficients and a finite "
                             f"offset; got {a.shape[0]} coefficients.")
        node.kind, node.a, node.b = "hyperplane", a, float(b)
        self._shape += 1
        node.evidence = dict(evidence or {})
        node.children = (self._add(node, 2 * node.key), self._add(node, 2 * node.key + 1))
        return node.children  # type: ignore[return-value]

    def split_random(self, leaf_id: int, n_pieces: int) -> tuple[int, ...]:
        """Deal a leaf's rows out at random into ``n_pieces`` pieces that share its region."""
        node = self._leaf(leaf_id)
        if n_pieces < 2:
            raise ValueError(f"A random split needs at least 2 pieces; got {n_pieces}.")
        node.kind, node.evidence = "random", {"pieces": n_pieces}
        self._shape += 1
        node.children = tuple(self._add(node, node.key * 1000 + i) for i in range(n_pieces))
        return node.children

    def split_groups(self, leaf_id: int, labels: list[str]) -> tuple[int, ...]:
        """One child per group: rows of group ``labels[i]`` go to child ``i`` (labels are
        compared as text). Returns the children, leaves."""
        node = self._leaf(leaf_id)
        labels = [str(g) for g in labels]
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ValueError("A groups node needs distinct group labels, at least one.")
        self.stability_ = None
        node.kind, node.evidence = "groups", {"groups": labels}
        self._shape += 1
        node.children = tuple(self._add(node, node.key * 1000 + i) for i in range(len(labels)))
        return node.children

    @property
    def group_labels(self) -> list[str] | None:
        """The group labels of the tree's groups node (None without one)."""
        for node in self.nodes.values():
            if node.kind == "groups":
                return list(node.evidence["groups"])
        return None

    def group_of_leaf(self) -> list[str | None]:
        """For each leaf, the group whose rows it holds (None outside a groups node)."""
        out = []
        for nid in self.leaves:
            label, child, parent = None, nid, self.nodes[nid].parent
            while parent >= 0:
                node = self.nodes[parent]
                if node.kind == "groups":
                    label = node.evidence["groups"][node.children.index(child)]
                    break
                child, parent = parent, node.parent
            out.append(label)
        return out

    def merge(self, node_id: int) -> int:
        """Make an internal node a leaf again, dropping everything below it."""
        node = self.nodes.get(node_id)
        if node is None or node.kind == "leaf":
            raise ValueError(f"Node {node_id} is not an internal node of this tree; merge takes "
                             "the parent of the leaves to merge.")
        stack = list(node.children)
        rows = 0
        while stack:
            child = self.nodes.pop(stack.pop())
            rows += child.n_rows if child.kind == "leaf" else 0
            stack.extend(child.children)
        node.kind, node.children, node.a, node.b, node.evidence = "leaf", (), None, 0.0, {}
        self._shape += 1
        node.n_rows = rows
        self.stability_ = None
        return node_id

    def _leaf(self, leaf_id: int) -> Node:
        node = self.nodes.get(leaf_id)
        if node is None or node.kind != "leaf":
            raise ValueError(f"Node {leaf_id} is not a leaf of this tree; "
                             f"the leaves are {self.leaves}.")
        return node

    # ---- routing ----------------------------------------------------------------------------
    def route(self, X, codes: np.ndarray | None = None,
              groups: np.ndarray | None = None) -> np.ndarray:
        """The leaf (position in :attr:`leaves`) of every row of the encoded features ``X``.

        Hyperplane nodes route by the features. Random nodes deal rows out among their pieces:
        stratified by class at random (with ``codes``, as when the tree was grown on training
        rows), or without codes by a fixed pseudo-random function of the row's values, so a
        given row always lands in the same piece. A groups node sends a row to its group's
        child (``groups``: one label per row); a row of an unknown group, or every row when
        ``groups`` is None, reaches no leaf: -1.
        """
        X = np.asarray(X, dtype=float)
        position = np.full(max(self.nodes) + 1, -1, dtype=np.int32)
        position[self.leaves] = np.arange(self.n_leaves)
        if groups is not None:
            groups = np.asarray(groups).astype(str).reshape(-1)
            if groups.shape[0] != X.shape[0]:
                raise ValueError(f"groups has {groups.shape[0]:,} labels for {X.shape[0]:,} "
                                 "rows; give one group label per row.")
        return self._route_from(0, X, codes, position, groups)

    def _route_from(self, top: int, X: np.ndarray, codes, position: np.ndarray,
                    groups: np.ndarray | None = None) -> np.ndarray:
        """Leaf positions of rows entering the tree at node ``top``."""
        end = self._ends(top, X)  # the leaf, random or groups node each row reaches
        out = position[end]
        for node in self.nodes.values():
            if node.kind not in ("groups", "random"):
                continue
            rows = np.flatnonzero(end == node.id)
            if rows.size == 0:
                continue
            if node.kind == "groups":
                out[rows] = -1  # a row of no known group (or given without one) reaches no leaf
                if groups is None:
                    continue
                index = {g: i for i, g in enumerate(node.evidence["groups"])}
                child = np.array([index.get(g, -1) for g in groups[rows]], dtype=np.int64)
            elif codes is not None:
                child = stratified_split(codes[rows], len(node.children),
                                         np.random.default_rng([self.seed, node.key]))
            else:
                child = self._hash_pieces(X[rows], node.key, len(node.children))
            for i, c in enumerate(node.children):
                mine = rows[child == i]
                if self.nodes[c].kind == "leaf":
                    out[mine] = position[c]
                elif mine.size:
                    out[mine] = self._route_from(c, X[mine], None if codes is None
                                                 else codes[mine], position,
                                                 None if groups is None else groups[mine])
        return out

    def route_blocks(self, blocks, n: int, codes: np.ndarray | None = None) -> np.ndarray:
        """:meth:`route` for rows that come in ``(start, rows)`` blocks (data read from disk).

        One pass: each block goes down the hyperplanes; the rows that reach a random node are
        then dealt out among its pieces as :meth:`route` deals them (by class over all of them
        with ``codes``, or by the hash of each row's values), so the result is the same.
        """
        if self.group_labels is not None:
            raise ValueError("Rows read in blocks cannot be routed to groups; load the rows "
                             "and their group labels as arrays.")
        randoms = {nd.id: nd for nd in self.nodes.values() if nd.kind == "random"}
        for node in randoms.values():
            if any(self.nodes[c].kind != "leaf" for c in node.children):
                raise ValueError(
                    "Rows read in blocks can only be routed through random pieces that are "
                    "leaves; this partition splits a random piece further.")
        end = np.empty(n, dtype=np.int32)
        hashed = np.zeros(n if codes is None and randoms else 0, dtype=np.int32)
        for a, Xb in blocks:
            e = self._ends(0, Xb)
            end[a : a + Xb.shape[0]] = e
            if hashed.shape[0]:
                for nid, node in randoms.items():
                    rows = np.flatnonzero(e == nid)
                    if rows.size:
                        hashed[a + rows] = self._hash_pieces(Xb[rows], node.key,
                                                             len(node.children))
        position = np.full(max(self.nodes) + 1, -1, dtype=np.int32)
        position[self.leaves] = np.arange(self.n_leaves)
        if len(randoms) == 1 and not (end != next(iter(randoms))).any():
            # every row reaches one random node (the static division): no row index needed,
            # which saves 8 bytes a row on data read from disk
            node = next(iter(randoms.values()))
            k = len(node.children)
            piece = (stratified_split(codes, k, np.random.default_rng([self.seed, node.key]))
                     if codes is not None else hashed)
            return position[np.array(node.children)][piece]
        out = position[end]
        for node in randoms.values():
            rows = np.flatnonzero(end == node.id)
            if rows.size == 0:
                continue
            k = len(node.children)
            piece = (stratified_split(codes[rows], k, np.random.default_rng([self.seed, node.key]))
                     if codes is not None else hashed[rows])
            for i, child in enumerate(node.children):
                out[rows[piece == i]] = position[child]
        return out

    def _ends(self, top: int, X: np.ndarray) -> np.ndarray:
        """For each row, the first leaf, random or groups node below ``top`` along the hyperplanes.

        Rows go in blocks (no temporary of the data's size: fresh memory is slow to touch).
        Up to :data:`TABLE_PLANES` hyperplanes, each block's sides are packed into one code
        per row and a table of all codes gives the node; deeper trees descend per block.
        """
        planes, stack = [], [top]
        while stack:
            node = self.nodes[stack.pop()]
            if node.kind == "hyperplane":
                planes.append(node)
                stack.extend(node.children)
        n = X.shape[0]
        end = np.empty(n, dtype=np.int32)  # 4 bytes a row: fresh pages are slow to touch
        if not planes:
            end[:] = top
            return end
        A = np.array([nd.a for nd in planes]).T
        b = np.array([nd.b for nd in planes])
        table = self._code_table(top, planes) if len(planes) <= TABLE_PLANES else None
        column = {nd.id: j for j, nd in enumerate(planes)}
        block = min(n, ROUTE_BLOCK)
        Z = np.empty((block, len(planes)))
        for a in range(0, n, block):
            m = min(block, n - a)
            Zb = np.matmul(X[a : a + m], A, out=Z[:m])
            if table is not None:
                packed = np.packbits(Zb <= b, axis=1, bitorder="little")
                code = packed[:, 0].astype(np.int64)
                if packed.shape[1] > 1:
                    code |= packed[:, 1].astype(np.int64) << 8
                end[a : a + m] = table[code]
                continue
            todo = [(top, np.arange(m))]
            while todo:
                nid, rows = todo.pop()
                node = self.nodes[nid]
                if node.kind != "hyperplane":
                    end[a + rows] = nid
                    continue
                left = Zb[rows, column[nid]] <= node.b
                todo.append((node.children[0], rows[left]))
                todo.append((node.children[1], rows[~left]))
        return end

    def _code_table(self, top: int, planes: list[Node]) -> np.ndarray:
        """For every code of hyperplane sides, the node (leaf, random or groups) a row ends in."""
        bit = {nd.id: j for j, nd in enumerate(planes)}
        codes = np.arange(2 ** len(planes))
        table = np.empty(codes.shape[0], dtype=np.int32)
        stack = [(top, codes)]
        while stack:
            nid, cs = stack.pop()
            node = self.nodes[nid]
            if node.kind != "hyperplane":
                table[cs] = nid
                continue
            left = (cs >> bit[nid]) & 1 == 1
            stack.append((node.children[0], cs[left]))
            stack.append((node.children[1], cs[~left]))
        return table

    def _hash_pieces(self, X: np.ndarray, key: int, k: int) -> np.ndarray:
        direction = np.random.default_rng([self.seed, key, 7]).standard_normal(X.shape[1])
        z = self.standardizer.transform(X) @ direction * 1e3
        return np.floor((z - np.floor(z)) * k).astype(np.int64).clip(0, k - 1)

    def count(self, leaf: np.ndarray) -> None:
        """Record training sizes from the leaf positions of the training rows."""
        self.count_sizes(np.bincount(leaf, minlength=self.n_leaves))

    def count_sizes(self, counts) -> None:
        """Record training sizes from each leaf's number of rows (in :attr:`leaves` order)."""
        for nid, c in zip(self.leaves, counts, strict=True):
            self.nodes[nid].n_rows = int(c)
        for node in sorted(self.nodes.values(), key=lambda n: -n.depth):
            if node.kind != "leaf":
                node.n_rows = sum(self.nodes[c].n_rows for c in node.children)

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"n_features": self.n_features, "n_classes": self.n_classes, "seed": self.seed,
                "next": self._next, "mean": self.standardizer.mean.tolist(),
                "scale": self.standardizer.scale.tolist(),
                "nodes": [n.to_dict() for n in self.nodes.values()], "growth": self.growth,
                "stability": None if self.stability_ is None else self.stability_.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> PartitionTree:
        std = Standardizer(np.asarray(d["mean"], dtype=float), np.asarray(d["scale"],
                                                                          dtype=float))
        tree = cls(int(d["n_features"]), int(d["n_classes"]), std, int(d["seed"]))
        tree.nodes = {int(n["id"]): Node.from_dict(n) for n in d["nodes"]}
        tree._next = int(d["next"])
        tree._check()
        tree.growth = dict(d["growth"]) if d.get("growth") else None
        if d.get("stability"):
            tree.stability_ = Stability.from_dict(d["stability"])
        return tree

    def _check(self) -> None:
        """Structural consistency of a restored tree (a damaged file must not route silently)."""
        if 0 not in self.nodes:
            raise ValueError("the tree has no root")
        seen = 0
        for node in self.nodes.values():
            if node.kind not in ("leaf", "hyperplane", "random", "groups"):
                raise ValueError(f"node {node.id} has an unknown kind {node.kind!r}")
            if (node.kind == "leaf") != (len(node.children) == 0):
                raise ValueError(f"node {node.id} is a {node.kind} with "
                                 f"{len(node.children)} children")
            for c in node.children:
                if c not in self.nodes or self.nodes[c].parent != node.id:
                    raise ValueError(f"node {c} is missing or does not name {node.id} as "
                                     "its parent")
            seen += len(node.children)
            if node.kind == "hyperplane" and (
                node.a is None or node.a.shape[0] != self.n_features or len(node.children) != 2
                or not np.all(np.isfinite(node.a)) or not np.isfinite(node.b)
            ):
                raise ValueError(f"node {node.id} is not a valid hyperplane split")
            if node.kind == "random" and len(node.children) < 2:
                raise ValueError(f"node {node.id} deals rows out to fewer than 2 pieces")
            if node.kind == "groups" and (
                not isinstance(node.evidence.get("groups"), list)
                or len(node.evidence["groups"]) != len(node.children)
            ):
                raise ValueError(f"node {node.id} does not name one group per child")
        if seen != len(self.nodes) - 1:
            raise ValueError("the nodes do not form one tree")
        reached, stack = {0}, [0]  # every node once from the root: no cycle, nothing apart
        while stack:
            for c in self.nodes[stack.pop()].children:
                if c in reached:
                    raise ValueError(f"node {c} is reached twice: the nodes form a cycle")
                reached.add(c)
                stack.append(c)
        if len(reached) != len(self.nodes):
            raise ValueError("some nodes are not reached from the root: the nodes form a cycle")

    def describe(self) -> TreeDescription:
        """One line per node, indented by depth: what it splits on and the rows behind it
        (:meth:`node_rows`). A list of the lines that prints as the tree."""
        lines = TreeDescription()
        rows = self.node_rows()

        def walk(nid: int) -> None:
            node = self.nodes[nid]
            what = {"leaf": "leaf", "random": f"random pieces ({len(node.children)})",
                    "groups": f"groups ({len(node.children)})"}.get(
                node.kind, node.evidence.get("candidate", "hyperplane"))
            parent = self.nodes.get(node.parent)
            if parent is not None and parent.kind == "groups":
                what += f" (group {parent.evidence['groups'][parent.children.index(nid)]})"
            lines.append(f"{'  ' * node.depth}[{nid}] {what}: {rows[nid]:,} rows")
            for c in node.children:
                walk(c)

        walk(0)
        return lines

    def node_rows(self) -> dict[int, int]:
        """The rows behind every node: a leaf's :attr:`sizes` (the rows its model was fitted
        on: after a refit on a stream, its recent rows), a split's the sum over its leaves."""
        out: dict[int, int] = {}

        def walk(nid: int) -> int:
            node = self.nodes[nid]
            out[nid] = (int(node.n_rows) if not node.children
                        else sum(walk(c) for c in node.children))
            return out[nid]

        walk(0)
        return out


@dataclass(frozen=True)
class Stability:
    """How much the partition changes when it is grown again on resamples of the rows.

    ``ari`` is the mean adjusted Rand index between the regions of every pair of trees grown on
    ``n_resamples`` random ``fraction``s of the rows (each tree routes all the given rows; 1:
    the same regions every time, about 0: no more alike than chance). ``ari_to_tree`` is the
    mean index between each of them and the given tree, ``n_regions`` their numbers of
    regions (random pieces of a region count once).
    """

    ari: float
    ari_pairs: tuple[float, ...]
    ari_to_tree: float | None
    n_regions: tuple[int, ...]
    fraction: float

    @property
    def n_resamples(self) -> int:
        return len(self.n_regions)

    def describe(self) -> str:
        """One line for people: the mean index and the regions found."""
        vs = "" if self.ari_to_tree is None else \
            f", {self.ari_to_tree:.2f} against the fitted tree"
        return (f"adjusted Rand index between partitions grown on {self.n_resamples} random "
                f"{self.fraction:.0%} resamples: {self.ari:.2f} (pairs {min(self.ari_pairs):.2f}"
                f" to {max(self.ari_pairs):.2f}){vs}; regions "
                f"{', '.join(str(r) for r in self.n_regions)}")

    def to_dict(self) -> dict:
        return {"ari": self.ari, "ari_pairs": list(self.ari_pairs),
                "ari_to_tree": self.ari_to_tree, "n_regions": list(self.n_regions),
                "fraction": self.fraction}

    @classmethod
    def from_dict(cls, d: dict) -> Stability:
        return cls(float(d["ari"]), tuple(float(a) for a in d["ari_pairs"]),
                   None if d["ari_to_tree"] is None else float(d["ari_to_tree"]),
                   tuple(int(r) for r in d["n_regions"]), float(d["fraction"]))
