"""Pure normalization: the schema, identity canonicalization, and one normalizer
per payload kind. No I/O; depends on nothing else of ours."""
