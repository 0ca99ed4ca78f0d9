"""One request's way through the service, whatever its delivery: parsed into the one internal
request type (`work`, `parsing`), admitted and delivered (`delivery`: an answer, a stream, a job), its
images produced (`generation`, `failover`), stored and recorded (`recording`); idempotency wraps it
from outside (`idempotency`, `claims`). Nothing here knows about HTTP."""
