"""Talking to OCI / Docker registries: auth, retries, manifests, blobs, tags, pushes."""
