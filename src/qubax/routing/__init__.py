"""What is served and by whom: the catalog (`catalog`), its models' entries (`models`: sizes, prices,
routes) and the one internal request a check makes (`request`), read from the built-in catalog file and
the operator's by one loader, and the routes' circuit breakers."""
