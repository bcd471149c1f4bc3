"""Message sources: one module per broker behind the MessageSource protocol."""
