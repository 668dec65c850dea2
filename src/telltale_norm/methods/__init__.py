"""One module per method; each is pure torch and acts on one layer's tokens of one step."""
