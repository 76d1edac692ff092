"""coexit edge package (filled in by later issues)."""
