"""The fleet: blockctl on Temporal, one worker per host (``blockctl[fleet]``).

``inventory`` (pure: the TOML inventory and the values workflows pass) is below
``activities`` (what a host's worker runs: blockctl's public library, nothing private), and
``workflows`` (deterministic; activities named by string, never imported), all three below
``worker`` and ``client``. Only ``inventory`` imports without temporalio installed.
"""
