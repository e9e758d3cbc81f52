"""The router's ZeroMQ daemon: `router.Router` (the sockets, the scheduler, the loops) and
its sides, each given the narrow interface it declares (never the `Router` itself):
clients (ZeroMQ clients), workers (the workers' messages), migration (KV states between
workers), joins (the join endpoint) and memory (stored conversations)."""
