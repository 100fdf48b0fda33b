"""Glue for third-party model libraries. Each submodule imports its library only when used."""
