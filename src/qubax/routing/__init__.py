"""What is served and by whom: the catalog (models, limits, prices, their routes), read from the
built-in catalog file and the operator's by one loader, and the routes' circuit breakers."""
