"""The edge: one adapter per channel (SMTP, IMAP, Twilio, web hooks).

Adapters land with their issues; each receives, authenticates, bounds,
normalizes and hands off, answering its sender only once the message is durable.
"""
