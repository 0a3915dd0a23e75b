"""Consumers of switchboard.routed.v1: the unified queue, forwarders, archive.
They land with their issues."""
