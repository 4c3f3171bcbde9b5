"""The Gleam version, reported in agent registrations and JSON output."""

VERSION = "0.1.0"
