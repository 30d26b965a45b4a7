"""Registry notifications -> the image pushes they report (bounded, checked, nothing trusted).

Two formats: the CNCF distribution registry's envelope
(``application/vnd.docker.distribution.events.v1+json``: ``events[]`` with ``action``,
``target.repository``, ``target.tag``, ``target.mediaType`` and ``request.host``) and Harbor's
webhook, in its default payload (``type`` ``PUSH_ARTIFACT``,
``event_data.resources[].resource_url``) or as a CloudEvent (``type``
``harbor.artifact.pushed``, ``data.resources[]``). Only pushes of manifests by tag are images
to convert; everything else is answered and dropped, and one bad event is skipped alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import UnpackedError, sanitize
from ..reference import ImageRef, parse

MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.oci.image.index.v1+json")
MAX_EVENTS = 1000
HARBOR_CLOUDEVENT_PUSH = "harbor.artifact.pushed"


class BadEvent(UnpackedError):
    """A notification that is not one of the formats understood (answered 400)."""


@dataclass(frozen=True)
class Push:
    ref: ImageRef


@dataclass
class Found:
    """The pushes a notification reports, and why the events it skipped were skipped (one
    bad event must not make the registry resend the whole envelope forever)."""

    pushes: list[Push] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        """A pushed ``host/repository:tag`` (never a digest: a push by tag names a tag)."""
        try:
            ref = parse(text)
        except UnpackedError as exc:
            self.skipped.append(sanitize(exc, 200))
            return
        if ref.digest or ref.is_wildcard or not _names_tag(text):
            self.skipped.append(f"{sanitize(text, 200)}: not a push by tag")
            return
        self.pushes.append(Push(ref))


def _names_tag(text: str) -> bool:
    """Does the reference spell a tag (``parse`` would otherwise supply ``latest``)?"""
    last = text.rsplit("/", 1)[-1]
    return ":" in last and "@" not in last


def _distribution(doc: dict) -> Found:
    events = doc.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise BadEvent(f"'events' must be a list of at most {MAX_EVENTS} events")
    found = Found()
    for event in events:
        if not isinstance(event, dict) or event.get("action") != "push":
            continue
        target, request = event.get("target"), event.get("request")
        if not isinstance(target, dict) or not isinstance(request, dict):
            found.skipped.append("an event without target or request")
            continue
        if target.get("mediaType") not in MANIFEST_TYPES or not target.get("tag"):
            continue                        # a blob, or a manifest pushed by digest
        host, repo, tag = request.get("host"), target.get("repository"), target.get("tag")
        if not all(isinstance(x, str) for x in (host, repo, tag)):
            found.skipped.append("an event whose host, repository or tag is not a string")
            continue
        found.add(f"{host}/{repo}:{tag}")
    return found


def _harbor(data: object) -> Found:
    """Harbor's ``event_data`` (its default payload) or ``data`` (its CloudEvents one)."""
    resources = data.get("resources") if isinstance(data, dict) else None
    if not isinstance(resources, list) or len(resources) > MAX_EVENTS:
        raise BadEvent(f"a Harbor event's resources must be a list of at most {MAX_EVENTS}")
    found = Found()
    for resource in resources:
        url = resource.get("resource_url") if isinstance(resource, dict) else None
        if isinstance(url, str):
            found.add(url)
        else:
            found.skipped.append("a resource without resource_url")
    return found


def pushes(body: bytes) -> Found:
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
        return _harbor(doc["event_data"]) if doc["type"] == "PUSH_ARTIFACT" else Found()
    if "specversion" in doc and isinstance(doc.get("type"), str):
        return _harbor(doc.get("data")) if doc["type"] == HARBOR_CLOUDEVENT_PUSH else Found()
    raise BadEvent(f"unknown event format (keys: {sanitize(', '.join(map(str, doc))[:100])})")
