"""Who holds the model, and so whether HE outputs must be sanitized (output privacy).

An HE output decrypts to the result plus what the evaluation left behind (noise, other
slots), all functions of the weights. When the data owner is also the model owner (one
process: ``compile`` then ``setup``) that reveals nothing new; when the model is deployed
(an artifact served to data owners who do not hold it) the server must sanitize its
outputs. A scheme's privacy option defaults to ``None`` (auto), resolved at compile time
from ``Scheme.deploy``: on for a deployed model (``secureinfer compile --out``,
``load_server``, ``secureinfer serve``), off in one process. The plan records the choice
(``output_privacy_by``) and ``SecureModel.save`` refuses to write a model whose outputs are
off by that default, so an artifact never ships unprotected outputs unless its owner opted
out explicitly.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["BY_DEPLOY", "BY_ONE_PROCESS", "BY_OPTION", "auto", "plan_keys", "save_problem"]

BY_OPTION = "option"
"""The user set the privacy option."""
BY_DEPLOY = "deploy"
"""Auto, on: compiled for deployment (the client does not hold the model)."""
BY_ONE_PROCESS = "one process"
"""Auto, off: compiled for one process (the client holds the model)."""

_WHY = {
    BY_OPTION: "set by the config",
    BY_DEPLOY: "on by default: compiled for deployment, the client does not hold the model",
    BY_ONE_PROCESS: "off by default: compiled for one process, where the client holds the "
                    "model; compile with deploy=True to deploy it",
}


def auto(deploy: bool) -> str:
    """How an unset (auto) privacy option resolves: ``BY_DEPLOY`` (on) or ``BY_ONE_PROCESS``."""
    return BY_DEPLOY if deploy else BY_ONE_PROCESS


def plan_keys(by: str, protection: str, opt_out: str) -> dict[str, Any]:
    """The plan's keys that say what protects the outputs and why.

    Args:
        by: ``BY_OPTION``, ``BY_DEPLOY`` or ``BY_ONE_PROCESS``.
        protection: what the scheme does to its outputs, with the statistical security and
            what it is measured against (or that it does nothing).
        opt_out: the explicit option that turns the protection off, e.g. ``flood_bits=0``.
    """
    return {"output_privacy": f"{protection} ({_WHY[by]})", "output_privacy_by": by,
            "output_privacy_opt_out": opt_out}


def save_problem(scheme: str, plan: Mapping[str, Any]) -> str | None:
    """Why a model with ``plan`` must not be written as an artifact (``None``: it may)."""
    if plan.get("output_privacy_by") != BY_ONE_PROCESS:
        return None
    opt_out = plan.get("output_privacy_opt_out", "")
    return (f"scheme {scheme}: this model was compiled for one process, so its outputs are "
            "not protected by default, and a deployed client that does not hold the model "
            "would learn more than the result from them. Compile it for deployment: "
            "secureinfer.compile(..., deploy=True) (as `secureinfer compile --out` does), or "
            f"set {opt_out} explicitly to ship unprotected outputs")
