"""The site agent: runs beside an institution's data, outbound connections only."""
