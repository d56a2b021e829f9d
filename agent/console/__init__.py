"""The technician console on a serial line (``cardagent console``).

:mod:`~agent.console.lines` (line discipline) and :mod:`~agent.console.session` (the command
interpreter) are sans-I/O; :mod:`~agent.console.device` reads and changes the data directory;
:mod:`~agent.console.serial_loop` is the thin pyserial transport.
"""
