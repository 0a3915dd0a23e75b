"""Switchboard's application shell: settings, Kafka clients and topics, the
embedded broker, the runtime and the CLI. No business logic lives here."""
