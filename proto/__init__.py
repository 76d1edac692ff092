"""Wire contract sources (.proto), package coexit.v1."""
