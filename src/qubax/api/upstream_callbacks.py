"""Where BFL, fal and Replicate call us back when a task ends (`providers.callbacks`): a verified
callback wakes the request or job waiting on the task, on whichever node holds it."""

import logging

from fastapi import APIRouter, Request, Response
from standardwebhooks import Webhook, WebhookVerificationError

from qubax.errors import AuthenticationError, RequestTooLarge
from qubax.protocol import error_responses
from qubax.providers.callbacks import PATH
from qubax.server.services import Services, ServicesDep

logger = logging.getLogger("qubax")
REFUSED = "This callback URL is not one this server handed out, or its signature does not match."

router = APIRouter()


@router.post(
    PATH + "/{provider}/{ref}/{signature}",
    status_code=204,
    responses=error_responses(401, 413),
    summary="Upstream task ended",
    description=(
        "Where an upstream (BFL, fal, Replicate) calls back when a task it accepted from Qubax ends; the "
        "URL is made per task, signed, and handed to the upstream only when `QUBAX_PUBLIC_URL` is set. Not "
        "for API clients. Answers 204 at once; a URL not signed by this service is refused with 401."
    ),
    tags=["Operations"],
)
async def upstream_callback(
    provider: str, ref: str, signature: str, request: Request, services: ServicesDep
) -> Response:
    callbacks = services.callbacks
    if callbacks is None or not callbacks.verified(provider, ref, signature):
        logger.warning("refused an upstream callback whose URL we did not sign")  # its path is anyone's text
        raise AuthenticationError(REFUSED, code="invalid_signature")
    if provider == "replicate" and not await signed_by_replicate(request, services):
        logger.warning("refused a Replicate callback without Replicate's signature")
        raise AuthenticationError(REFUSED, code="invalid_signature")
    await callbacks.wake(ref)
    return Response(status_code=204)


async def signed_by_replicate(request: Request, services: Services) -> bool:
    """Replicate's own Standard Webhooks signature, where the operator gave us its secret."""
    secret = services.settings.replicate_webhook_secret
    if secret is None:
        return True
    limit, body = services.settings.max_upload_bytes, bytearray()
    async for chunk in request.stream():  # a prediction echoes its inputs: images, perhaps
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"A callback body may be at most {limit} bytes.")
    try:
        Webhook(secret.get_secret_value()).verify(bytes(body), dict(request.headers))
    except (WebhookVerificationError, ValueError):  # ValueError: a body that is not JSON
        return False
    return True
