"""The HTTP surface: the public routes, the jobs routes and the admin API, reading bodies, the key
dependency, and the API's documentation. Routes parse into the pipeline's `Work` and render its `Answer`."""
