"""The worker daemon (worker) and KV states moved between workers (migration). Imports the
engine and the store."""
