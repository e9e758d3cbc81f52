"""What the router counts and shows: one set of counts (stats), their Prometheus export
(metrics) and the cluster's picture (snapshot). Imports policy, never the daemon."""
