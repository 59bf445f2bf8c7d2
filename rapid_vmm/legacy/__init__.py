"""The original RAPID TCP protocol: codec, front end, peer mode, import."""
