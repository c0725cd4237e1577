"""The partition tree: structure, routing, persistence, and how it grows with granularity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import make_regions
from fedgrain.partition.growth import _valley_cut, grow, leaf_seeds, region_budget, split_level
from fedgrain.partition.tree import PartitionTree, stratified_split

GRANULARITIES = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


def _grow(X, y, n_classes, *, granularity, min_size, n_pieces=1, seed=0):
    return grow(X, y, None, std=Standardizer.fit(X), n_classes=n_classes,
                granularity=granularity, min_size=min_size, n_pieces=n_pieces, seed=seed,
                feature_names=[f"x{j}" for j in range(X.shape[1])])


@st.composite
def problems(draw):
    """Small region data: (X, y, n_classes, min_size), min_size at most half the rows."""
    n = draw(st.integers(300, 3000))
    p = draw(st.integers(2, 4))
    K = draw(st.integers(3, 4))
    R = draw(st.integers(1, 3))
    h = draw(st.sampled_from([0.0, 1.5]))
    data_seed = draw(st.integers(0, 10_000))
    X, y, _, _, _ = make_regions(n, n_features=p, n_classes=K, n_regions=R, heterogeneity=h,
                                 random_state=data_seed)
    min_size = draw(st.integers(10, n // 2))
    return X, y, K, min_size


def _n_regions(tree: PartitionTree) -> int:
    return len(np.unique(tree.region_of()))


def _canonical(tree: PartitionTree) -> str:
    return json.dumps(tree.to_dict(), sort_keys=True)


def _hand_tree():
    """Two features; x0 <= 0 goes left, the right side is split again at x1 <= 1."""
    X = np.array([[-1.0, 5.0], [0.0, 5.0], [1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [3.0, -4.0]])
    tree = PartitionTree(2, 3, Standardizer.fit(X))
    left, right = tree.split(tree.root, np.array([1.0, 0.0]), 0.0)
    low, high = tree.split(right, np.array([0.0, 1.0]), 1.0)
    return tree, X, (left, right, low, high)


@pytest.fixture(scope="module")
def grown_with_pieces():
    """Three regions, some of them dealt out into random pieces."""
    X, y, _, _, _ = make_regions(3000, n_features=3, n_classes=3, n_regions=3,
                                 heterogeneity=1.5, random_state=1)
    grown = _grow(X, y, 3, granularity=0.5, min_size=50, n_pieces=5, seed=1)
    kinds = {n.kind for n in grown.tree.nodes.values()}
    assert kinds == {"hyperplane", "random", "leaf"}  # the fixture exercises every node kind
    return X, y, grown


# ---- invariants of grown trees ---------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(problem=problems(), g=st.sampled_from(GRANULARITIES), n_pieces=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_leaves_are_disjoint_and_cover_the_rows(problem, g, n_pieces, seed):
    X, y, K, min_size = problem
    grown = _grow(X, y, K, granularity=g, min_size=min_size, n_pieces=n_pieces, seed=seed)
    tree, n = grown.tree, X.shape[0]
    assert grown.leaf.shape == (n,)
    assert grown.leaf.min() >= 0 and grown.leaf.max() < tree.n_leaves
    np.testing.assert_array_equal(np.bincount(grown.leaf, minlength=tree.n_leaves), tree.sizes)
    assert tree.sizes.sum() == n
    assert tree.nodes[tree.root].n_rows == n
    for node in tree.nodes.values():  # internal sizes add up
        if node.kind != "leaf":
            assert node.n_rows == sum(tree.nodes[c].n_rows for c in node.children)
    assert sorted(grown.profile.leaves) == sorted(tree.leaves)


@settings(max_examples=25, deadline=None)
@given(problem=problems(), n_pieces=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_leaves_and_regions_never_decrease_as_granularity_grows(problem, n_pieces, seed):
    X, y, K, min_size = problem
    leaves, regions = [], []
    for g in GRANULARITIES:
        tree = _grow(X, y, K, granularity=g, min_size=min_size, n_pieces=n_pieces,
                     seed=seed).tree
        leaves.append(tree.n_leaves)
        regions.append(_n_regions(tree))
    assert regions[0] == 1
    assert np.all(np.diff(regions) >= 0), regions
    if n_pieces <= 2:  # with more pieces, dealing out under min_size may rarely give fewer
        assert np.all(np.diff(leaves) >= 0), leaves


@settings(max_examples=25, deadline=None)
@given(problem=problems(), g=st.sampled_from(GRANULARITIES), n_pieces=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_no_leaf_below_min_size(problem, g, n_pieces, seed):
    X, y, K, min_size = problem
    grown = _grow(X, y, K, granularity=g, min_size=min_size, n_pieces=n_pieces, seed=seed)
    assert grown.tree.sizes.min() >= min_size


@settings(max_examples=25, deadline=None)
@given(problem=problems(), g=st.sampled_from(GRANULARITIES), n_pieces=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_routing_the_training_rows_reproduces_their_leaves(problem, g, n_pieces, seed):
    X, y, K, min_size = problem
    grown = _grow(X, y, K, granularity=g, min_size=min_size, n_pieces=n_pieces, seed=seed)
    tree = grown.tree
    np.testing.assert_array_equal(tree.route(X, y), grown.leaf)
    # without codes random pieces route by a hash of the row, but the region is the same
    region = tree.region_of()
    np.testing.assert_array_equal(region[tree.route(X)], region[grown.leaf])


@settings(max_examples=25, deadline=None)
@given(problem=problems(), g=st.sampled_from(GRANULARITIES), n_pieces=st.integers(1, 4),
       seed=st.integers(0, 10_000), other=st.integers(0, 10_000))
def test_same_seed_same_tree_and_other_seed_other_pieces(problem, g, n_pieces, seed, other):
    X, y, K, min_size = problem
    a = _grow(X, y, K, granularity=g, min_size=min_size, n_pieces=n_pieces, seed=seed)
    b = _grow(X, y, K, granularity=g, min_size=min_size, n_pieces=n_pieces, seed=seed)
    assert _canonical(a.tree) == _canonical(b.tree)
    np.testing.assert_array_equal(a.leaf, b.leaf)

    assume(other != seed)
    c = _grow(X, y, K, granularity=0.0, min_size=min_size, n_pieces=2, seed=seed)
    d = _grow(X, y, K, granularity=0.0, min_size=min_size, n_pieces=2, seed=other)
    assert c.tree.n_leaves == d.tree.n_leaves == 2  # min_size <= n / 2
    assert not np.array_equal(c.leaf, d.leaf)


# ---- structure --------------------------------------------------------------------------------
def test_split_then_route_a_hand_made_tree():
    tree, X, (left, right, low, high) = _hand_tree()
    assert tree.leaves == [left, low, high]  # depth first, left before right
    assert [tree.nodes[i].key for i in (left, right, low, high)] == [2, 3, 6, 7]
    assert tree.nodes[right].kind == "hyperplane" and tree.nodes[right].children == (low, high)
    assert tree.sizes.tolist() == [0, 0, 0]  # sizes wait for count
    leaf = tree.route(X)
    # rows on a hyperplane (x0 = 0, x1 = 1) go left
    np.testing.assert_array_equal(leaf, [0, 0, 1, 1, 2, 1])
    tree.count(leaf)
    assert tree.sizes.tolist() == [2, 3, 1]
    assert tree.nodes[right].n_rows == 4 and tree.nodes[tree.root].n_rows == 6
    np.testing.assert_array_equal(tree.siblings(), [tree.root, right, right])
    np.testing.assert_array_equal(tree.region_of(), [left, low, high])


def test_merge_restores_a_leaf_and_its_size():
    tree, X, (left, right, low, high) = _hand_tree()
    tree.count(tree.route(X))
    assert tree.merge(right) == right
    assert tree.leaves == [left, right]
    assert tree.nodes[right].kind == "leaf" and tree.nodes[right].children == ()
    assert tree.nodes[right].a is None
    assert low not in tree.nodes and high not in tree.nodes
    assert tree.sizes.tolist() == [2, 4]
    np.testing.assert_array_equal(tree.route(X), [0, 0, 1, 1, 1, 1])
    # the merged leaf can be split again, at the same keys
    again = tree.split(right, np.array([0.0, 1.0]), 1.0)
    assert [tree.nodes[i].key for i in again] == [6, 7]
    # merging the root counts every leaf below it once, however deep
    tree.count(tree.route(X))
    tree.merge(tree.root)
    assert tree.leaves == [tree.root] and len(tree.nodes) == 1
    assert tree.sizes.tolist() == [6]
    with pytest.raises(ValueError, match="Node 0 is not an internal node"):
        tree.merge(tree.root)  # a leaf: nothing to merge, and its size is kept
    assert tree.sizes.tolist() == [6]


def test_split_of_a_non_leaf_names_the_leaves():
    tree, _, (left, right, low, high) = _hand_tree()
    with pytest.raises(ValueError, match=rf"Node {right} is not a leaf.*\[{left}, {low}, {high}\]"):
        tree.split(right, np.array([1.0, 0.0]), 0.0)
    with pytest.raises(ValueError, match="Node 42 is not a leaf"):
        tree.split_random(42, 2)


def test_split_needs_one_finite_coefficient_per_feature():
    tree, _, (left, *_rest) = _hand_tree()
    with pytest.raises(ValueError, match="needs 2 finite coefficients.*got 3"):
        tree.split(left, np.array([1.0, 0.0, 0.0]), 0.0)
    with pytest.raises(ValueError, match="finite"):
        tree.split(left, np.array([np.nan, 1.0]), 0.0)
    with pytest.raises(ValueError, match="finite offset"):
        tree.split(left, np.array([1.0, 1.0]), np.inf)
    assert tree.nodes[left].kind == "leaf"  # a refused split leaves the tree as it was


def test_random_split_needs_two_pieces():
    tree, _, (left, *_rest) = _hand_tree()
    for pieces in (0, 1):
        with pytest.raises(ValueError, match=f"at least 2 pieces; got {pieces}"):
            tree.split_random(left, pieces)
    pieces = tree.split_random(left, 3)
    assert [tree.nodes[i].key for i in pieces] == [2000, 2001, 2002]
    assert tree.region_of()[:3].tolist() == [left] * 3


def test_json_round_trip_routes_identically(grown_with_pieces):
    X, y, grown = grown_with_pieces
    tree = grown.tree
    back = PartitionTree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert _canonical(back) == _canonical(tree)
    assert back.leaves == tree.leaves and back.describe() == tree.describe()
    np.testing.assert_array_equal(back.sizes, tree.sizes)
    np.testing.assert_array_equal(back.region_of(), tree.region_of())
    np.testing.assert_array_equal(back.route(X, y), grown.leaf)
    X_new, _, _, _, _ = make_regions(2000, n_features=3, n_classes=3, n_regions=3,
                                     heterogeneity=1.5, random_state=99)
    np.testing.assert_array_equal(back.route(X_new), tree.route(X_new))
    # a restored tree keeps growing with fresh ids
    new = back.split(back.leaves[0], np.ones(3), 0.0)
    assert min(new) >= max(tree.nodes) + 1


def _damaged(tree: PartitionTree, damage) -> dict:
    d = json.loads(json.dumps(tree.to_dict()))
    damage({n["id"]: n for n in d["nodes"]}, d)
    return d


def test_from_dict_refuses_a_damaged_tree(grown_with_pieces):
    tree = grown_with_pieces[2].tree
    plane = next(n.id for n in tree.nodes.values() if n.kind == "hyperplane" and n.id != 0)
    piece = next(n.id for n in tree.nodes.values() if n.kind == "random")

    def wrong_parent(nodes, d):
        nodes[tree.nodes[piece].children[0]]["parent"] = 0

    def short_plane(nodes, d):
        nodes[plane]["a"] = nodes[plane]["a"][:-1]

    def no_root(nodes, d):
        d["nodes"] = [n for n in d["nodes"] if n["id"] != 0]

    def orphan(nodes, d):
        d["nodes"].append(dict(nodes[tree.leaves[0]], id=99, parent=0))

    def missing_child(nodes, d):
        nodes[plane]["children"] = [nodes[plane]["children"][0], 999]

    def leaf_with_children(nodes, d):
        nodes[plane]["kind"] = "leaf"

    def unknown_kind(nodes, d):
        nodes[plane]["kind"] = "banana"

    def nan_plane(nodes, d):
        nodes[plane]["a"] = [float("nan")] * len(nodes[plane]["a"])

    cases = [(wrong_parent, f"does not name {piece} as its parent"),
             (short_plane, f"node {plane} is not a valid hyperplane"),
             (no_root, "no root"), (orphan, "do not form one tree"),
             (missing_child, "node 999 is missing"),
             (leaf_with_children, f"node {plane} is a leaf with 2 children"),
             (unknown_kind, "unknown kind 'banana'"),
             (nan_plane, f"node {plane} is not a valid hyperplane")]
    for damage, message in cases:
        with pytest.raises(ValueError, match=message):
            PartitionTree.from_dict(_damaged(tree, damage))


def test_describe_lists_every_node(grown_with_pieces):
    tree = grown_with_pieces[2].tree
    lines = tree.describe()
    assert len(lines) == len(tree.nodes)
    for nid, node in tree.nodes.items():
        (line,) = [s for s in lines if f"[{nid}] " in s]
        assert line.startswith("  " * node.depth + f"[{nid}]")
        assert line.endswith(f"{node.n_rows:,} rows")
        if node.kind == "random":
            assert f"random pieces ({len(node.children)})" in line
        elif node.kind == "hyperplane":
            assert node.evidence["candidate"] in line


def test_new_rows_route_deterministically_and_evenly_over_pieces():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 3))
    tree = PartitionTree(3, 3, Standardizer.fit(X), seed=5)
    tree.split_random(tree.root, 2)
    X_new = rng.standard_normal((4000, 3)) * 2.0 + 1.0
    first = tree.route(X_new)
    np.testing.assert_array_equal(tree.route(X_new), first)
    share = np.bincount(first, minlength=2) / X_new.shape[0]
    assert np.all((share >= 0.35) & (share <= 0.65)), share
    # a function of each row alone: the order of the rows does not matter
    order = rng.permutation(X_new.shape[0])
    np.testing.assert_array_equal(tree.route(X_new[order]), first[order])
    # with class codes the pieces are stratified by class
    y = rng.integers(0, 3, X_new.shape[0])
    counts = np.bincount(tree.route(X_new, y) * 3 + y, minlength=6).reshape(2, 3)
    assert np.all(np.ptp(counts, axis=0) <= 1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 7), K=st.integers(1, 5), seed=st.integers(0, 999))
def test_stratified_split_balances_every_class(n, k, K, seed):
    codes = np.random.default_rng(seed).integers(0, K, n)
    labels = stratified_split(codes, k, np.random.default_rng(seed))
    assert labels.min() >= 0 and labels.max() < k
    assert np.ptp(np.bincount(labels, minlength=k)) <= 1
    per_class = np.bincount(labels * K + codes, minlength=k * K).reshape(k, K)
    assert np.all(np.ptp(per_class, axis=0) <= 1)


# ---- growth ------------------------------------------------------------------------------------
def test_granularity_zero_is_the_static_stratified_division():
    X, y, _, _, _ = make_regions(3001, n_features=3, n_classes=4, n_regions=3,
                                 heterogeneity=1.5, random_state=4)
    grown = _grow(X, y, 4, granularity=0.0, min_size=100, n_pieces=3, seed=4)
    tree = grown.tree
    assert tree.n_leaves == 3
    assert tree.region_of().tolist() == [tree.root] * 3  # one region: the pieces share it
    assert tree.nodes[tree.root].kind == "random"
    assert np.ptp(tree.sizes) <= 1
    per_class = np.bincount(grown.leaf * 4 + y, minlength=12).reshape(3, 4)
    assert np.all(np.ptp(per_class, axis=0) <= 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leaves_recover_the_true_regions(seed):
    X, y, region, _, _ = make_regions(6000, n_features=4, n_classes=4, n_regions=3,
                                      heterogeneity=1.5, random_state=seed)
    grown = _grow(X, y, 4, granularity=0.5, min_size=100, seed=seed)
    assert adjusted_rand_score(region, grown.leaf) >= 0.8
    assert all(n.evidence["p_value"] < split_level(0.5)
               for n in grown.tree.nodes.values() if n.kind == "hyperplane")


@pytest.mark.parametrize("n_regions", [1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_one_model_everywhere_gives_one_region(n_regions, seed):
    X, y, _, _, _ = make_regions(6000, n_features=4, n_classes=4, n_regions=n_regions,
                                 heterogeneity=0.0, random_state=seed)
    grown = _grow(X, y, 4, granularity=0.5, min_size=100, seed=seed)
    assert _n_regions(grown.tree) == 1


def test_split_level_and_region_budget_grow_with_granularity():
    gs = np.linspace(0.0, 1.0, 101)
    levels = np.array([split_level(g) for g in gs])
    assert split_level(0.0) == 0.0
    assert split_level(1.0) == pytest.approx(0.05, rel=1e-12)
    assert split_level(0.5) == pytest.approx(5e-5, rel=1e-12)
    assert np.all(np.diff(levels) > 0)
    for n, m in [(1000, 100), (999, 100), (10_000, 7), (50, 100), (1_000_000, 1000)]:
        budget = np.array([region_budget(g, n, m) for g in gs])
        assert budget[0] == 1
        assert budget[-1] == max(1, n // m)
        assert np.all(np.diff(budget) >= 0)
    # the floor does not lose a whole region to rounding: 1000^(1/3) is 10
    assert region_budget(1 / 3, 1000, 1) == 10


def test_leaf_seeds_follow_the_node_not_the_order_of_growth():
    X = np.random.default_rng(0).standard_normal((10, 2))

    def build(right_first: bool) -> PartitionTree:
        tree = PartitionTree(2, 3, Standardizer.fit(X))
        left, right = tree.split(tree.root, np.array([1.0, 0.0]), 0.0)
        for leaf in ((right, left) if right_first else (left, right)):
            tree.split(leaf, np.array([0.0, 1.0]), 0.0)
        return tree

    a, b = build(False), build(True)
    assert a.leaves != b.leaves  # different node ids ...
    assert leaf_seeds(a, 3) == leaf_seeds(b, 3)  # ... same seeds
    assert len(set(leaf_seeds(a, 3))) == a.n_leaves
    assert leaf_seeds(a, 3) != leaf_seeds(a, 4)


def test_trees_at_two_granularities_share_the_seeds_of_common_leaves():
    X, y, _, _, _ = make_regions(3000, n_features=3, n_classes=3, n_regions=3,
                                 heterogeneity=1.5, random_state=1)
    coarse = _grow(X, y, 3, granularity=0.25, min_size=50, seed=1).tree
    fine = _grow(X, y, 3, granularity=1.0, min_size=50, seed=1).tree
    assert fine.n_leaves > coarse.n_leaves > 1

    def by_key(tree):
        keys = [tree.nodes[i].key for i in tree.leaves]
        return dict(zip(keys, leaf_seeds(tree, 1), strict=True))

    ca, fi = by_key(coarse), by_key(fine)
    common = set(ca) & set(fi)
    assert common
    assert all(ca[k] == fi[k] for k in common)
    # the finer tree extends the coarser one: the same cuts at the same nodes
    cuts = {n.key: (n.a.tolist(), n.b) for n in fine.nodes.values() if n.kind == "hyperplane"}
    for node in coarse.nodes.values():
        if node.kind == "hyperplane":
            assert cuts[node.key] == (node.a.tolist(), node.b)


def test_valley_cut():
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(-3, 1, 1000), rng.normal(3, 1, 1000)])
    for median in (True, False):
        cut = _valley_cut(np.sort(bimodal), median=median)
        assert cut is not None and -1.5 < cut < 1.5
    normal = np.sort(rng.normal(0.5, 1, 2000))
    assert _valley_cut(normal, median=True) == pytest.approx(np.median(normal), abs=0.1)
    assert _valley_cut(normal, median=False) is None
    binary = np.sort(rng.integers(0, 2, 1000).astype(float))
    assert _valley_cut(binary, median=True) == 0.5
    assert _valley_cut(binary, median=False) == 0.5  # nothing between 0 and 1: a valley
    rare = np.sort((rng.random(1000) < 0.05).astype(float))  # one side under 10%: no cut
    assert _valley_cut(rare, median=False) is None
    constant = np.full(500, 2.5)
    assert _valley_cut(constant, median=True) is None
    assert _valley_cut(constant, median=False) is None


@pytest.mark.parametrize("n, m, k", [(10, 3, 2), (5_000, 4, 5), (2_100_000, 7, 3)])
def test_stratified_split_deals_as_the_plain_rule_says(n, m, k):
    """The chunked dealing equals the plain rule: shuffle each class, deal in turn, carry
    the rotation from class to class."""
    from fedgrain.partition.tree import stratified_split

    codes = np.random.default_rng(n).integers(0, k, n).astype(np.int8)
    got = stratified_split(codes, m, np.random.default_rng([1, 2]))
    rng = np.random.default_rng([1, 2])
    want = np.empty(n, dtype=np.int64)
    offset = int(rng.integers(m))
    for c in np.unique(codes):
        rows = np.flatnonzero(codes == c)
        want[rows[rng.permutation(rows.shape[0])]] = (np.arange(rows.shape[0]) + offset) % m
        offset = (offset + rows.shape[0]) % m
    np.testing.assert_array_equal(got, want)
