"""Identity lookups the producers need: DID documents through the PLC directory or did:web, handles
to DIDs, and DID lists from flags or files."""
