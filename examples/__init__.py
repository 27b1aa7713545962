"""Example saga applications."""
