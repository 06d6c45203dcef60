"""Model recipes (torch) and the federated preprocessing they need."""
