"""The router: a broker between clients and workers. Four rooms, lowest first; a room
imports only the rooms below it (tests/test_layers.py):

- `policy/`: the decisions, pure: no I/O, no clock (every method takes `now`), no logging;
  table-tested. Where a request runs (scheduler, placement, costs, records), whether it is
  taken and as what (admission, prefix), whose it is (identity), how often (ratelimit),
  where its answer goes (jobs).
- `observe/`: what the router counts (stats, one set of counts), exports (metrics, for
  Prometheus) and shows (snapshot, for `pichat status`); it reads the daemon through the
  narrow `Observed` interface, never the daemon's class.
- `api/`: the HTTP faces (app: aiohttp routes and guards; openai, ollama and tools:
  translations, pure; embedbatch). They reach the router only through `RouterFace`
  (api/app.py), never the daemon's internals.
- `daemon/`: the ZeroMQ daemon. `router.Router` owns the sockets, the scheduler and the
  loops; its sides (clients, workers, migration, joins, memory) each receive the narrow
  interface they need, declared in their own module, never the `Router` itself.
"""
