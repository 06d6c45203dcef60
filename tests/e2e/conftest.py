from fedtools import federation  # noqa: F401  (fixture)
