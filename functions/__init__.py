"""Thin Azure Functions triggers onto the mail2blob engine, one blueprint per module."""
