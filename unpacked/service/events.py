"""Registry notifications -> the image pushes they report (bounded, checked, nothing trusted).

Two formats: the CNCF distribution registry's envelope
(``application/vnd.docker.distribution.events.v1+json``: ``events[]`` with ``action``,
``target.repository``, ``target.tag``, ``target.mediaType`` and ``request.host``) and Harbor's
webhook (``type`` ``PUSH_ARTIFACT``, ``event_data.resources[].resource_url``). Only pushes of
manifests by tag are images to convert; everything else is answered and dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import UnpackedError, sanitize
from ..reference import ImageRef, parse

MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.oci.image.index.v1+json")
MAX_EVENTS = 1000


class BadEvent(UnpackedError):
    """A notification that is not one of the formats understood (answered 400)."""


@dataclass(frozen=True)
class Push:
    ref: ImageRef


def _ref(text: str) -> ImageRef | None:
    try:
        ref = parse(text)
    except UnpackedError:
        return None
    return ref if ref.tag and not ref.is_wildcard else None


def _distribution(doc: dict) -> list[Push]:
    events = doc.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise BadEvent("'events' must be a list of at most 1000 events")
    pushes = []
    for event in events:
        if not isinstance(event, dict) or event.get("action") != "push":
            continue
        target, request = event.get("target") or {}, event.get("request") or {}
        if not isinstance(target, dict) or not isinstance(request, dict):
            raise BadEvent("an event's target and request must be objects")
        if target.get("mediaType") not in MANIFEST_TYPES or not target.get("tag"):
            continue                        # a blob, or a manifest pushed by digest
        host, repo, tag = request.get("host"), target.get("repository"), target.get("tag")
        if not all(isinstance(x, str) for x in (host, repo, tag)):
            raise BadEvent("an event's host, repository and tag must be strings")
        ref = _ref(f"{host}/{repo}:{tag}")
        if ref is not None:
            pushes.append(Push(ref))
    return pushes


def _harbor(doc: dict) -> list[Push]:
    if doc.get("type") != "PUSH_ARTIFACT":
        return []
    data = doc.get("event_data") or {}
    resources = data.get("resources") if isinstance(data, dict) else None
    if not isinstance(resources, list) or len(resources) > MAX_EVENTS:
        raise BadEvent("'event_data.resources' must be a list")
    pushes = []
    for resource in resources:
        url = resource.get("resource_url") if isinstance(resource, dict) else None
        if not isinstance(url, str):
            raise BadEvent("a resource's resource_url must be a string")
        ref = _ref(url)
        if ref is not None:
            pushes.append(Push(ref))
    return pushes


def pushes(body: bytes) -> list[Push]:
    """The image pushes a notification body reports; BadEvent when it is no known format."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadEvent("not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadEvent("not a JSON object")
    if "events" in doc:
        return _distribution(doc)
    if isinstance(doc.get("type"), str) and "event_data" in doc:
        return _harbor(doc)
    raise BadEvent(f"unknown event format (keys: {sanitize(', '.join(map(str, doc))[:100])})")
