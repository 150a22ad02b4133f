"""/v1/webhooks: endpoints that receive job events (Standard Webhooks), and their delivery logs."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.utils import json_body
from app.api.webhooks.schemas import (
    DeliveryPageSchema,
    WebhookCreatedSchema,
    WebhookCreateSchema,
    WebhookListQuerySchema,
    WebhookPageSchema,
    WebhookSchema,
)
from app.auth import current_owner_id
from app.services import webhooks as service

blp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks", description="Webhook endpoints")


@blp.route("")
class Webhooks(MethodView):
    @blp.arguments(WebhookListQuerySchema, location="query")
    @blp.response(200, WebhookPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List the key's webhook endpoints, newest first (cursor paged; secrets are not shown)."""
        items, cursor = service.list_endpoints(current_owner_id(), args["limit"], args["cursor"])
        return {"items": [service.endpoint_view(e) for e in items], "next_cursor": cursor}

    @json_body
    @blp.arguments(WebhookCreateSchema)
    @blp.response(201, WebhookCreatedSchema)
    @blp.alt_response(409, response="CONFLICT", description="The key has as many endpoints as it may")
    def post(self, args: dict[str, Any]) -> dict[str, Any]:
        """Register an endpoint for some event types; the answer carries its signing secret, once.

        422 names `url` when it is not https (unless the server allows http) or its host resolves to a
        loopback, private, link-local or otherwise non-public address."""
        endpoint = service.create_endpoint(current_owner_id(), args["url"], args["events"])
        return service.endpoint_view(endpoint, with_secret=True)


@blp.route("/<string:webhook_id>")
class WebhookById(MethodView):
    @blp.response(200, WebhookSchema)
    def get(self, webhook_id: str) -> dict[str, Any]:
        """Read one endpoint (without its secret)."""
        return service.endpoint_view(service.get_endpoint(current_owner_id(), webhook_id))

    @blp.response(204)
    def delete(self, webhook_id: str) -> None:
        """Delete an endpoint; deliveries not yet made to it are dropped."""
        service.delete_endpoint(current_owner_id(), webhook_id)


@blp.route("/<string:webhook_id>/enable")
class WebhookEnable(MethodView):
    @blp.response(200, WebhookSchema)
    def post(self, webhook_id: str) -> dict[str, Any]:
        """Send to an endpoint again after its receiver disabled it with a 410 Gone (events from now on).

        Idempotent; 422 names `url` when the URL is no longer allowed."""
        return service.endpoint_view(service.enable_endpoint(current_owner_id(), webhook_id))


@blp.route("/<string:webhook_id>/deliveries")
class WebhookDeliveries(MethodView):
    @blp.arguments(WebhookListQuerySchema, location="query")
    @blp.response(200, DeliveryPageSchema)
    def get(self, args: dict[str, Any], webhook_id: str) -> dict[str, Any]:
        """The endpoint's delivery log, newest first: attempts, status codes, errors and the next retry."""
        items, cursor = service.list_deliveries(current_owner_id(), webhook_id, args["limit"], args["cursor"])
        return {"items": [service.delivery_view(d) for d in items], "next_cursor": cursor}
