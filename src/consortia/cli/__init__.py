"""The ``consortia`` command line (typer): thin, it parses, calls the API, prints."""
