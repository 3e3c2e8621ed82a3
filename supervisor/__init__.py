"""blast-supervisor: a sidecar daemon that makes api-blast's WhatsApp sends reliable."""

__version__ = "0.1.0"
