"""Pure normalization: the schema, identity canonicalization, and one normalizer
per payload kind. No I/O; depends on nothing else of ours."""

# Every process that parses MIME imports this package: the standard library's MIME
# parameter splitter is replaced here by a linear one (see normalize.mimeparams).
from normalize import mimeparams as _mimeparams

_mimeparams.install()
