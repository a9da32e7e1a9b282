"""Datamodules for users' own image-text data (group ``tarkit.datamodules``)."""
