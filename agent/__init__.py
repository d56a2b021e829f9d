"""cardagent: an open terminal agent for city one-card (城市一卡通) transit and payment cards."""

__version__ = "0.1.0"
