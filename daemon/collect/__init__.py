"""Traces in: OpenTelemetry spans, sent over OTLP/HTTP, taken in as reflexd's own messages.

``otlp`` decodes an export request's body; ``spans`` reads each span into what reflexd keeps of
it (the GenAI semantic conventions, the allow-list, the content policy, redaction);
``reward`` evaluates the configured reward expressions; ``episodes`` assembles the steps of an
episode, whose spans arrive over several requests, into Step and Event messages; ``journal``
keeps the steps still waiting for their episode across restarts; ``receiver`` is the HTTP side.
"""
