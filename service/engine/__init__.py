"""The core every dialect calls: validate, tokenize, batch, infer, pool, normalize, encode."""
