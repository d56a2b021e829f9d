"""The reference clearing host: HTTP server, storage, record screening and operator tools.

Terminals never import this package (``tests/test_layers.py``): a validator installs only
``agent`` and ``sync``; the host's dependencies (starlette, uvicorn, psycopg) come with the
``host`` extra (``pip install cardagent[host]``).
"""
