"""Code both processes use: the typed config, the wire messages, adapters and the transports."""
