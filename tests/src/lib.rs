//! Shared helpers for the workspace integration tests and their fake programs.
