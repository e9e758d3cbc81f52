"""The router's memory: conversations kept for their owners (store.py: the interface;
sqlite.py: the default, one file)."""
