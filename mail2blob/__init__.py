"""mail2blob: drain Microsoft 365 mailboxes over IMAP (OAuth2 XOAUTH2) into Azure Blob Storage.

The engine takes its clients as parameters; ``mail2blob.clients`` builds them from settings for the
Function App and the command line.
"""

__version__ = "0.1.0"
