"""Limits of the platform a Job passes through, in one place, each with its source.

They are checked where they apply: ``validate`` refuses settings that can never work,
and a message whose Job would break one is dead-lettered ``MessageTooLarge`` (or
``TemplateError`` for what a template made of it) before any Job exists.
"""

from __future__ import annotations

import re

MAX_ARG_STRLEN = 32 * 4096
"""Linux: the longest single argv or environment string execve() accepts, counting
``NAME=`` and the terminating NUL (``MAX_ARG_STRLEN`` in include/uapi/linux/binfmts.h).
Beyond it execve fails with E2BIG, "Argument list too long"."""

SECRET_DATA_MAX = 1024 * 1024
"""Kubernetes: the values of a Secret's ``data`` may total 1 MiB
(``MaxSecretSize`` in k8s.io/kubernetes/pkg/apis/core/validation)."""

ANNOTATIONS_MAX = 256 * 1024
"""Kubernetes: an object's annotations (keys and values) may total 256 KiB
(``TotalAnnotationSizeLimitB`` in apimachinery's ValidateAnnotations)."""

OBJECT_MAX = 1536 * 1024
"""etcd: the largest request it takes by default (``--max-request-bytes`` 1.5 MiB); an
object is stored in one request, so a Job (and the Pod made from it) must stay below."""

LABEL_VALUE_MAX = 63
"""Kubernetes: a label value is at most 63 characters (IsValidLabelValue)."""

_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def is_label_value(text: str) -> bool:
    """Whether ``text`` is a valid label value (``IsValidLabelValue`` in apimachinery's
    util/validation): empty, or at most LABEL_VALUE_MAX ASCII letters, digits, '-', '_'
    and '.', beginning and ending with a letter or digit."""
    return len(text) <= LABEL_VALUE_MAX and _LABEL_VALUE.fullmatch(text) is not None


SECRET_RESERVE = 64 * 1024
"""What a message Secret keeps beside the body (headers, metadata, the kept copy's
fields), reserved when bounding ``maxMessageBytes``."""

MESSAGE_MAX = SECRET_DATA_MAX - SECRET_RESERVE
"""The largest ``maxMessageBytes`` that always fits in the per-Job Secret."""


def env_value_max(name: str) -> int:
    """The longest value (in bytes) an environment variable ``name`` can carry into a
    process: MAX_ARG_STRLEN less ``NAME=`` and the NUL."""
    return MAX_ARG_STRLEN - len(name.encode()) - 2


DNS1123_LABEL_MAX = 63
"""Kubernetes: a namespace name, and any name that becomes a label value or part of a
DNS name, is a DNS-1123 label: at most 63 characters, lowercase letters, digits and '-',
starting and ending with a letter or digit (``IsDNS1123Label`` in apimachinery's
util/validation)."""

DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS1123_LABEL = re.compile(DNS1123_LABEL_PATTERN)


def dns1123_label_problem(text: str, what: str = "a name") -> str | None:
    """Why ``text`` is not a DNS-1123 label (see DNS1123_LABEL_MAX), or None when it is."""
    if len(text) > DNS1123_LABEL_MAX:
        return f"{what} is at most {DNS1123_LABEL_MAX} characters, got {len(text)}"
    if not _DNS1123_LABEL.fullmatch(text):
        return (
            f"{what} must be lowercase letters, digits and '-', starting and ending with a "
            f"letter or digit (a DNS-1123 label), got {text!r}"
        )
    return None


DNS1123_SUBDOMAIN_MAX = 253
"""Kubernetes: the name of most objects — Secrets, ConfigMaps, Jobs, Pods, Leases, Events
and custom resources such as TriggerAuthentications — is a DNS-1123 subdomain: at most
253 characters, lowercase letters, digits, '-' and '.', starting and ending with a letter
or digit, each dot-separated part a DNS-1123 label (``IsDNS1123Subdomain`` in
apimachinery's util/validation). So '.', '..', '/', '%' and uppercase can never be part of
one, which is what keeps such a name one segment of an API path."""

DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS1123_SUBDOMAIN = re.compile(DNS1123_SUBDOMAIN_PATTERN)


def dns1123_subdomain_problem(text: str, what: str = "a name") -> str | None:
    """Why ``text`` is not a DNS-1123 subdomain (see DNS1123_SUBDOMAIN_MAX), or None when
    it is."""
    if len(text) > DNS1123_SUBDOMAIN_MAX:
        return f"{what} is at most {DNS1123_SUBDOMAIN_MAX} characters, got {len(text)}"
    if not _DNS1123_SUBDOMAIN.fullmatch(text):
        return (
            f"{what} must be lowercase letters, digits, '-' and '.', starting and ending with "
            f"a letter or digit (a DNS-1123 subdomain), got {text!r}"
        )
    return None
