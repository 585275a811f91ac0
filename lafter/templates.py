"""Sentence templates with a ``{}`` for the class name: the reference's hand-made ImageNet and CIFAR
ensembles (stage 0's templates, and the zero-shot baseline's prompt ensemble) and the domain
templates used when the user names the images' domain (``{domain}``)."""

from __future__ import annotations

# The reference's eight hand-made ImageNet templates, verbatim.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a {} in a video game.",
    "a origami {}.",
    "a photo of the small {}.",
    "art of the {}.",
    "a photo of the large {}.",
    "itap of a {}.",
)

_CIFAR_ADJECTIVE_PHOTOS = (
    "photo of {} {{}}.",
    "blurry photo of {} {{}}.",
    "black and white photo of {} {{}}.",
    "low contrast photo of {} {{}}.",
    "high contrast photo of {} {{}}.",
    "bad photo of {} {{}}.",
    "good photo of {} {{}}.",
    "photo of {} small {{}}.",
    "photo of {} big {{}}.",
)

# The 18 CIFAR templates: nine "a ..." photo variants, then the same nine with "the".
CIFAR_TEMPLATES: tuple[str, ...] = tuple(
    f"a {pattern.format(article)}" for article in ("a", "the") for pattern in _CIFAR_ADJECTIVE_PHOTOS
)

# Domain templates replace the photo templates when the user names the target domain: "a photo of
# a cat" describes the wrong thing when every image is a sketch.
DOMAIN_TEMPLATES: tuple[str, ...] = (
    "a {domain} of a {}.",
    "a {domain} of the {}.",
    "a {domain} of a small {}.",
    "a {domain} of a large {}.",
    "a bad {domain} of the {}.",
    "a good {domain} of a {}.",
    "a {domain} showing a {}.",
    "a close-up {domain} of the {}.",
)

__all__ = ["CIFAR_TEMPLATES", "DOMAIN_TEMPLATES", "IMAGENET_TEMPLATES"]
