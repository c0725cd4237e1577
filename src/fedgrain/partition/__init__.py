"""The partition of the data: the tree that routes rows to leaves (``tree``), its growth by
tested splits (``growth``) and the profile of its leaves (``profile``)."""

from .profile import DataProfile, LeafProfile
from .tree import Node, PartitionTree, stratified_split

__all__ = ["DataProfile", "LeafProfile", "Node", "PartitionTree", "stratified_split"]
