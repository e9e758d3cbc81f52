"""The router's decisions, as pure functions and state machines: no I/O, no clock, no
logging. They import only the wire (pichat.protocol, pichat.errors) and each other."""
