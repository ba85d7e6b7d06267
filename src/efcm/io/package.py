"""The model package format (`efcm.package/2`): its name, its error, and the patch geometry it
records. Writing is `efcm.training.export`; loading as modules is `efcm.models.package`."""

from __future__ import annotations

from typing import Any

FORMAT = "efcm.package/2"


# patch keys that are not the package's geometry: how a batch treats failures, and the mpp
# override of one training slide (a served slide gets its own mpp, or --mpp)
NOT_GEOMETRY = ("fail_on", "mpp_override")


def geometry(settings: dict[str, Any]) -> dict[str, Any]:
    """The patch settings that make a slide's patches (all but NOT_GEOMETRY)."""
    return {k: v for k, v in settings.items() if k not in NOT_GEOMETRY}
