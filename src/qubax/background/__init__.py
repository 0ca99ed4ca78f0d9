"""Work that outlives a request: jobs and the runner that makes them, webhooks and their delivery,
and the loop both share."""
