"""The router side: the daemon (service) and its pure routing policy (scheduler)."""
