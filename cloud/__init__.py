"""coexit cloud package (filled in by later issues)."""
