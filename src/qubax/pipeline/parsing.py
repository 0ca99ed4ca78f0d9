"""From the wire to the one internal request type: a generation's or an edit's fields, and an edit's
uploads, checked against the catalog into an `ImageRequest`."""

from qubax.pipeline.uploads import read_uploads
from qubax.protocol import ImageEditRequest, ImageGenerateRequest
from qubax.routing.request import ImageRequest
from qubax.server.services import Services


def check_generation(body: ImageGenerateRequest, services: Services) -> ImageRequest:
    return services.catalog.check(body)


async def check_edit(form: ImageEditRequest, services: Services) -> ImageRequest:
    """An edit's fields checked first, then its uploads."""
    request = services.catalog.check_edit(form)
    images, mask = await read_uploads(form.images, form.mask, services.decoding)
    return services.catalog.check_inputs(request, form.size, images, mask)
