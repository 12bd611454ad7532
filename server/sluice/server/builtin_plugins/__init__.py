"""Sluice\x27s own plugins, registered through its entry points like anyone else\x27s."""
