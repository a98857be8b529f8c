"""Layer: audit. Audit your own defence: any model, any SAE, any clamp, any prompts, from one config.

- ``config``: ``AuditConfig`` (TOML keys = command-line flags), read and checked before anything loads;
- ``behaviours``: the behaviours recovered (continuation, refusal, choice, logit difference) and
  their prompt rows;
- ``setting``: the audit as a setting of the one driver (``jaxrecover.experiment.driver``).

``jaxrecover audit CONFIG.toml`` on the command line; ``jaxrecover.audit.run_audit(config)`` in Python.
The commented example config ships as ``jaxrecover/data/audit_example.toml``.
"""

from typing import Any


def run_audit(config: Any, **overrides: Any) -> dict[str, Any]:
    """Run one audit (an ``AuditConfig``, a TOML path or a dict of keys); see ``setting.run_audit``."""
    from jaxrecover.audit import setting

    return setting.run_audit(config, **overrides)
