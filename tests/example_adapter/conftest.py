# Lets pytest import switchboard_example from this directory when Switchboard's own
# suite collects tests/example_adapter/tests (pytest puts a conftest's directory on
# sys.path). An installed copy of the package needs nothing of the kind.
