"""Shared fixtures: Azurite (tests/azurite.py) for every test module that asks for it."""

pytest_plugins = ["tests.azurite"]
