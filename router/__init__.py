"""The router: consumer group on switchboard.inbound.v1 that deduplicates,
resolves the contact and keeps its one owner. Lands with its issue."""
