"""pichat: one LLM chat service from a handful of small computers.

`pichat router` load-balances chat requests over `pichat worker`s with session affinity;
`pichat ask` / `chat` / `status` are the clients. See README.md.
"""

__version__ = "0.1.0"
