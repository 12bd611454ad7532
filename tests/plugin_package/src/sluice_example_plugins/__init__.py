"""Example third-party Sluice plugins."""
