"""Which conversation's KV state lives where, inside one worker: in a slot or in memory
(slots), on disk (disk), and which part of a conversation fits the context (window).
Imports the engine, never the daemon."""
