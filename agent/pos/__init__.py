"""The POS plugin: a local JSON API for a shop's POS software (``cardagent pos``).

``service``: purchases by order id through the validator's engine and journal, card reads,
order look-ups, refunds as signed requests for the clearing host, recent transactions;
``orders``: the durable order book; ``journal``: the engine's journal and presence rule for
explicit POS requests; ``http``: the loopback HTTP server (standard library); ``cli``: the
subcommand.
"""
