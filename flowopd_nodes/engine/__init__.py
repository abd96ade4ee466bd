"""The graph engine: graph files, validation, the caching scheduler, typed ports, errors, run context."""
