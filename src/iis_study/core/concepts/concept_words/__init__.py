"""Concept word lists shipped with the project (data files, read by ``core.concepts.textual``)."""
