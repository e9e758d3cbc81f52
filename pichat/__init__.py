"""pichat: one LLM chat service from a handful of small computers.

`pichat router` load-balances chat requests over `pichat worker`s with session affinity;
`pichat ask` / `chat` / `status` are the clients. See README.md and docs/.

The house, floor by floor (a module imports its own floor or those below, never above;
tests/test_layers.py holds the code to it):

- base: errors, logs (escaping, clipping, throttled logging), unpack (bounded msgpack),
  claims, ready, daemon (process chores).
- wire: protocol (every message, its fields and their bounds), stream (a stream's cursor),
  schemas (JSON schemas and patterns, checked before any grammar is made).
- policy: router/policy, pure decisions about requests and workers.
- shared: config (every daemon's settings and defaults), security (keys, ZAP), transport
  and link (sockets), health, discovery (mDNS), invites (join tokens), models (GGUF files),
  memory (the conversation stores).
- roles: router/ (the broker), worker/ (a model's host), client and console (the clients).
- commands: cli/ (the `pichat` command), cluster (`pichat up`), bounds (the index of every
  bound on what a peer can cost).
"""

__version__ = "0.1.0"
