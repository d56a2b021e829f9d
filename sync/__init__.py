"""The edge sync daemon and the reference clearing host (see architecture.md "Sync")."""
