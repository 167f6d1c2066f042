"""Test-only hooks read from the environment: the crash points that the resume tests inject.

``CYTONET_EXTRACT_CRASH=<shard>:<patches>`` (:mod:`cytonet.data.extract`) and ``CYTONET_INFER_CRASH=<N>:before``
or ``<N>:after`` (:mod:`cytonet.infer.run`) make a process exit abruptly at a chosen point. Unset or empty, a hook
is off. A value of any other form is refused with a :class:`~cytonet.errors.UsageError` naming the variable and
the value: a hook that reads ``1:sideways`` as ``1:after``, or ignores ``0:-1``, would let a resume test pass
without the crash it asked for.

Entry point: :func:`read_hook`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from cytonet.errors import UsageError


def read_hook(name: str, pattern: str, form: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The groups of ``pattern`` matched by the whole value of variable ``name`` (``environ`` defaults to
    ``os.environ``); None when it is unset or empty. ``form`` describes the accepted values for the error."""
    raw = (os.environ if environ is None else environ).get(name, "")
    if not raw:
        return None
    m = re.fullmatch(pattern, raw)
    if m is None:
        raise UsageError(f"{name}={raw!r} is not {form} (a test hook: unset it to run normally)")
    return m.groups()
