"""Federation: placing subsets on workers (``shards``, ``schedule``), the engine that fits and
pools them, and the federated meta-learner (``meta``)."""
