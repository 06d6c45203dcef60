"""Pure numerical core: parameters, aggregation strategies, metrics. No I/O here."""
