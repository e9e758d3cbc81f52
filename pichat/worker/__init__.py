"""The worker: a model's host. Three rooms, lowest first; a room imports only the rooms
below it (tests/test_layers.py):

- `engine/`: the inference backends behind one interface (backend): llama.cpp (llama, one
  context per slot; batch, one batched context; llamalib, what both do through the C API)
  and a simulator (sim); what every engine shares: KV reuse when a conversation's start
  slid out (shift), tokens to chunks (textstream), tools and grammars (tools, toolfit) and
  the notes of what slid out (summary). `load_model` picks one.
- `store/`: which conversation's KV state lives where: slots (in memory, within a budget),
  disk (across restarts), window (which part of a conversation the context holds).
- `daemon/`: the worker daemon (worker: the socket to the router, heartbeats, one thread
  per slot) and KV states moving between workers (migration).
"""
