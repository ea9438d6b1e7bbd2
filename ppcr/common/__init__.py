"""Shared by every layer above: rank/world facts and collectives, logging sinks, checkpoint paths,
random-generator states as JSON."""
